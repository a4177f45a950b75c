"""Statistics of a perplexity or KL-divergence run, with llama-perplexity's definitions and error estimates.

Uncertainties are standard errors of the mean over scored tokens (``sqrt(var / (n - 1))``), propagated the
way ``llama-perplexity`` does (ppl error = ppl * error of the mean log-likelihood; ratios use the covariance of
the two models' per-token log-likelihoods). Percentiles interpolate linearly between sorted values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def mean_and_error(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    var = float((x * x).mean() - m * m)
    return m, (math.sqrt(var / (x.size - 1)) if var > 0 and x.size > 1 else 0.0)


@dataclass
class PerplexityStats:
    ppl: float
    ppl_error: float
    mean_nll: float
    tokens: int  # scored tokens

    @classmethod
    def of(cls, nll: np.ndarray) -> "PerplexityStats":
        m, e = mean_and_error(nll)
        ppl = math.exp(m) if nll.size else float("nan")
        return cls(ppl, ppl * e, m, int(nll.size))


def _percentiles(x: np.ndarray, ps) -> dict[str, float]:
    return {f"{p:g}": float(np.percentile(x, p)) for p in ps}


@dataclass
class KLDStats:
    """llama-perplexity --kl-divergence's report; Q is the evaluated model, base the reference."""

    tokens: int
    ppl: float
    ppl_error: float
    ppl_base: float
    ppl_base_error: float
    log_ppl_correlation: float
    log_ppl_ratio: float
    log_ppl_ratio_error: float
    ppl_ratio: float
    ppl_ratio_error: float
    ppl_diff: float
    ppl_diff_error: float
    kld_mean: float
    kld_error: float
    kld_max: float
    kld_min: float
    kld_percentiles: dict = field(default_factory=dict)
    dp_mean: float = 0.0  # Δp = p(token) under Q - under base
    dp_error: float = 0.0
    dp_max: float = 0.0
    dp_min: float = 0.0
    dp_percentiles: dict = field(default_factory=dict)
    dp_rms: float = 0.0
    dp_rms_error: float = 0.0
    same_top: float = 0.0  # fraction of positions where both models' most likely token is the same
    same_top_error: float = 0.0

    @classmethod
    def of(cls, nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, same_top: np.ndarray) -> "KLDStats":
        nll, nll_base, kld = (np.asarray(a, dtype=np.float64) for a in (nll, nll_base, kld))
        n = nll.size
        lq, elq = mean_and_error(nll)
        lb, elb = mean_and_error(nll_base)
        cov = (float((nll * nll_base).mean() - lq * lb) / (n - 1)) if n >= 10 else 0.0
        ppl, ppl_b = math.exp(lq), math.exp(lb)
        cor = cov / (elq * elb) if elq > 0 and elb > 0 else float("nan")
        lr, elr = lq - lb, math.sqrt(max(elq**2 + elb**2 - 2 * cov, 0.0))
        ppl_err, ppl_b_err = ppl * elq, ppl_b * elb
        diff_err = math.sqrt(max(ppl_err**2 + ppl_b_err**2 - 2 * ppl * ppl_b * cov, 0.0))
        km, ke = mean_and_error(kld)
        dp = np.exp(-nll) - np.exp(-nll_base)
        dm, de = mean_and_error(dp)
        mse, mse_e = mean_and_error(dp * dp)
        rms = math.sqrt(mse)
        st = float(np.mean(same_top))
        return cls(
            tokens=n, ppl=ppl, ppl_error=ppl_err, ppl_base=ppl_b, ppl_base_error=ppl_b_err,
            log_ppl_correlation=cor, log_ppl_ratio=lr, log_ppl_ratio_error=elr,
            ppl_ratio=math.exp(lr), ppl_ratio_error=math.exp(lr) * elr, ppl_diff=ppl - ppl_b, ppl_diff_error=diff_err,
            kld_mean=km, kld_error=ke, kld_max=float(kld.max()), kld_min=float(kld.min()),
            kld_percentiles=_percentiles(kld, KLD_PERCENTILES),
            dp_mean=dm, dp_error=de, dp_max=float(dp.max()), dp_min=float(dp.min()),
            dp_percentiles=_percentiles(dp, DP_PERCENTILES),
            dp_rms=rms, dp_rms_error=(0.5 / rms * mse_e) if rms > 0 else 0.0,
            same_top=st, same_top_error=math.sqrt(st * (1 - st) / (n - 1)) if n > 1 else 0.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """The three blocks llama-perplexity prints, in its layout."""
        pct = lambda k: {"50": "Median "}.get(k, f"{float(k):4.1f}%  ")  # noqa: E731
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl:10.6f} ± {self.ppl_error:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_error:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.log_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.log_ppl_ratio:10.6f} ± {self.log_ppl_ratio_error:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_error:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_error:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.kld_mean:10.6f} ± {self.kld_error:10.6f}",
            f"Maximum KLD: {self.kld_max:10.6f}",
            *[f"{pct(k)} KLD: {v:10.6f}" for k, v in self.kld_percentiles.items()],
            f"Minimum KLD: {self.kld_min:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * self.dp_mean:6.3f} ± {100 * self.dp_error:5.3f} %",
            f"Maximum Δp: {100 * self.dp_max:6.3f}%",
            *[f"{pct(k)} Δp: {100 * v:6.3f}%" for k, v in self.dp_percentiles.items()],
            f"Minimum Δp: {100 * self.dp_min:6.3f}%",
            f"RMS Δp    : {100 * self.dp_rms:6.3f} ± {100 * self.dp_rms_error:5.3f} %",
            f"Same top p: {100 * self.same_top:6.3f} ± {100 * self.same_top_error:5.3f} %",
        ]
        return "\n".join(lines)
