"""kld: the quantized model against the float model's logits on the evaluation text."""

from __future__ import annotations

from tbpw import Column, EvalContext, Evaluator


class KlDivergence(Evaluator):
    name = "kld"
    description = "perplexity, KL divergence, ln-PPL correlation and same-top-p against the baseline's logits"
    default = True
    columns = (
        Column("ppl", "μPPL", lower_is_better=True, error_key="ppl_error"),
        Column("rho_ppl", "𝜌PPL", lower_is_better=False, digits=2, suffix="%"),
        Column("kld_mean", "μKLD", lower_is_better=True, digits=6, error_key="kld_mean_error"),
        Column("kld_p99", "KLD p99", lower_is_better=True, digits=6),
        Column("same_top_p", "Same top-p", lower_is_better=False, digits=2, suffix="%", error_key="same_top_p_error"),
        Column("ppl_error", "μPPL ±", table="none"),
        Column("ppl_base", "base PPL", table="none"),
        Column("ln_ppl_ratio", "mean ln(PPL(Q)/PPL(base))", table="none", digits=6),
        Column("kld_mean_error", "μKLD ±", table="none", digits=6),
        Column("kld_median", "KLD median", table="none", digits=6),
        Column("kld_p99_9", "KLD p99.9", lower_is_better=True, table="none", digits=6),
        Column("kld_max", "KLD max", table="none", digits=6),
        Column("same_top_p_error", "same top-p ±", table="none", digits=2),
        Column("rms_delta_p", "RMS Δp", lower_is_better=True, table="none", digits=3, suffix="%"),
    )

    def baseline_values(self, ppl: float, ppl_error: float) -> dict[str, float]:
        return {"ppl": ppl, "ppl_error": ppl_error}

    def ranking(self) -> tuple[str, ...]:
        return ("kld_mean", "rho_ppl")

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        r = context.kl_divergence()
        return {
            "ppl": r.ppl_q.value, "ppl_error": r.ppl_q.error, "ppl_base": r.ppl_base.value,
            "rho_ppl": r.ln_ppl_correlation_pct, "ln_ppl_ratio": r.ln_ppl_ratio.value,
            "kld_mean": r.kld.mean.value, "kld_mean_error": r.kld.mean.error, "kld_median": r.kld.median,
            "kld_p99": r.kld.percentiles.get(99.0, float("nan")), "kld_p99_9": r.kld.percentiles.get(99.9, float("nan")),
            "kld_max": r.kld.maximum, "same_top_p": r.same_top_p_pct.value, "same_top_p_error": r.same_top_p_pct.error,
            "rms_delta_p": r.rms_delta_p_pct.value,
        }
