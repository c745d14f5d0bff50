"""The stages of a run, one module each, in the order data flows:

    model -> data -> baseline -> imatrix -> measure -> stock / plan -> calibrate -> choose
          -> compare -> evaluate -> bench -> release

Each module declares what its stage is: its options model (its own, or the one of the algorithm below it that
takes the object, e.g. `tbpw.select.options.ChooseOptions`), its name in the run directory (`name`), its step
(`run(ctx, ...)`: inputs in, outputs written into its stage folder through `StageContext.stage`, a small result
back) and its cost estimate (`cost(size, ...)`: a `Cost` of quantizations, KLD runs, evaluation runs, tokens
and bytes, known before any work). `tbpw.run.pipeline` only wires the stages into the task graph, and
`tbpw.run.costplan` sums their estimates; a benchmark runs these same steps with the same options objects.
"""
