"""Built-in evaluators: KL divergence against the baseline logits, HellaSwag, WinoGrande, multiple choice.

Each runs llama-perplexity in one of its modes (through `EvalContext`) and returns flat named numbers; its
`columns` say what they are, which rank quants, and where the report shows them.
"""

from __future__ import annotations

from tbpw import hookimpl


@hookimpl
def tbpw_register_evaluators(register) -> None:
    from .kld import KlDivergence
    from .tasks import HellaSwag, MultipleChoice, WinoGrande

    for cls in (KlDivergence, HellaSwag, WinoGrande, MultipleChoice):
        register(cls)
