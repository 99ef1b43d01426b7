"""The layers of a traced function and the order in which to prune them.

A *layer* is one weight matrix: a selected leaf, or one slice of it along a
scanned axis (a stacked leaf consumed inside ``scan`` gives one layer per
iteration). Layer B *depends on* layer A when the input of one of B's
matmuls/convolutions is computed from the output of one of A's. The *stage* of
a layer is the length of the longest chain of dependencies that ends in it,
read off one pass over the jaxpr in program order (scans unrolled), so
stage 0 is every layer that sees the raw inputs, and in a transformer block
q/k/v share a stage, the attention output projection takes the next, then the
MLP's up and down projections. Sequential one-shot pruning (SparseGPT,
Frantar & Alistarh 2023; Wanda, Sun et al. 2023, both prune LLMs block by
block) prunes stage by stage, computing the inputs of stage k with stages < k
already pruned; this is the "true sequential" order of the SparseGPT code.
A weight used several times (shared across loop steps) takes the stage of its
first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from jaxprune.structured import jaxpr_params as jp
from jaxprune.weight_sites import Site, SiteError, View, find_site, leaf_view, propagate, slice_view

__all__ = ["Layers", "analyze_layers"]

def _is_lit(v: Any) -> bool:
    return type(v).__name__ == "Literal"


@dataclasses.dataclass
class Layers:
    """What ``analyze_layers`` learns from a jaxpr.

    ``sites[k]``: the matmul/convolution sites of leaf ``k`` (one per equation);
    ``stage[(k, coords)]``: the stage of each layer, ``coords`` being
    ``((leaf_axis, index), ...)`` along the leaf's scanned axes (``()`` for a
    leaf that is one layer); ``lost[k]``: primitives where leaf ``k``'s value
    stopped being a plain re-indexing of it (to explain an unused leaf).
    """

    sites: dict[int, list[Site]]
    stage: dict[tuple, int]
    lost: dict[int, list[str]]

    def stages(self) -> list[list[tuple]]:
        """Layers grouped by stage, in stage order (layers in first-use order)."""
        out: dict[int, list[tuple]] = {}
        for unit, s in self.stage.items():
            out.setdefault(s, []).append(unit)
        return [out[s] for s in sorted(out)]


class _Walker:
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.sites: dict[int, dict[tuple, Site]] = {}
        self.stage: dict[tuple, int] = {}
        self.lost: dict[int, list[str]] = {}

    def walk(self, jaxpr: Any, views: list, levels: list, scope: tuple, inside: str = "") -> tuple:
        env: dict[Any, tuple[Optional[View], int]] = {}
        for v in jaxpr.constvars:
            env[v] = (None, 0)
        for v, view, lev in zip(jaxpr.invars, views, levels):
            env[v] = (view, lev)

        def read(v):
            return (None, 0) if _is_lit(v) else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            ins = [read(v) for v in eqn.invars]
            in_views, in_levels = [x[0] for x in ins], [x[1] for x in ins]
            outs = self.equation(eqn, in_views, in_levels, scope + (i,), inside)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        outs = [read(v) for v in jaxpr.outvars]
        return [o[0] for o in outs], [o[1] for o in outs]

    def equation(self, eqn, views, levels, sub, inside) -> list:
        name = eqn.primitive.name
        top = max(levels, default=0)
        if name in jp.CALL_PARAMS:
            jaxpr = jp.call(eqn).jaxpr
            return list(zip(*self.walk(jaxpr, views, levels, sub, inside)))
        if name == "scan":
            return self.scan(eqn, views, levels, sub, inside)
        if name in ("cond", "while"):
            return self.loop(eqn, views, levels, sub, name)
        site = find_site(eqn, views, self.paths)
        if site is not None:
            if inside:
                raise SiteError(f"leaf '{self.paths[site.leaf]}' is multiplied inside `{inside}`; "
                                "calibration cannot collect statistics there (move the matmul "
                                "out of the cond/while_loop, or leave the leaf out of where=)")
            self._record(site, sub)
            unit = (site.leaf, tuple(sorted((a, idx) for a, _, idx in site.scans)))
            act = levels[1 - site.operand]
            stage = self.stage.setdefault(unit, act)
            return [(None, max(act, stage + 1))]
        out_views = propagate(eqn, views)
        for v, o in zip(views, out_views + [None] * len(views)):
            if v is not None and o is None:
                self.lost.setdefault(v.leaf, [])
                if name not in self.lost[v.leaf]:
                    self.lost[v.leaf].append(name)
        return [(ov, top) for ov in out_views]

    def _record(self, site: Site, key: tuple) -> None:
        have = self.sites.setdefault(site.leaf, {})
        first = next(iter(have.values()), None)
        if first is not None and first.layout() != site.layout():
            raise SiteError(
                f"leaf '{self.paths[site.leaf]}' is used by two matmuls that disagree on its "
                f"input/group axes ({first.layout()[:2]} vs {site.layout()[:2]}); one-shot "
                "pruning needs one input-feature axis layout per leaf")
        have.setdefault(key, site)

    def scan(self, eqn, views, levels, sub, inside) -> list:
        lay = jp.scan(eqn)
        nc, nk, length, body = lay.num_consts, lay.num_carry, lay.length, lay.body.jaxpr
        consts, carry, xs = (list(range(nc)), list(range(nc, nc + nk)),
                             list(range(nc + nk, len(views))))
        sliced = any(views[k] is not None for k in xs)
        carry_lv = [levels[k] for k in carry]
        ys_lv = [0] * (len(eqn.outvars) - nk)
        ys_views = [None] * len(ys_lv)
        steps = range(length) if sliced else range(nk + 2)  # unsliced: iterate to a fixed point
        for t in steps:
            index = (length - 1 - t) if lay.reverse else t
            bviews = ([views[k] for k in consts] + [None] * nk
                      + [slice_view(views[k], sub, index if sliced else None) for k in xs])
            blev = [levels[k] for k in consts] + carry_lv + [levels[k] for k in xs]
            out_v, out_lv = self.walk(body, bviews, blev, sub, inside)
            new_carry = [max(a, b) for a, b in zip(carry_lv, out_lv[:nk])]
            ys_lv = [max(a, b) for a, b in zip(ys_lv, out_lv[nk:])]
            if not sliced and new_carry == carry_lv and t > 0:
                break
            carry_lv = new_carry
        for k in xs:  # a leaf sliced by the scan but consumed by no matmul there
            if views[k] is not None and slice_view(views[k], sub, 0) is None:
                self.lost.setdefault(views[k].leaf, []).append("scan (sliced along a merged axis)")
        return [(None, lv) for lv in carry_lv] + [(v, lv) for v, lv in zip(ys_views, ys_lv)]

    def loop(self, eqn, views, levels, sub, name) -> list:
        top = max(levels, default=0)
        if name == "cond":
            for b, branch in enumerate(jp.cond_branches(eqn)):
                _, lv = self.walk(branch.jaxpr, views[1:], levels[1:], sub + (b,), "cond")
                top = max([top] + lv)
        else:
            lay = jp.while_loop(eqn)
            cn, bn = lay.cond_nconsts, lay.body_nconsts
            carry = levels[cn + bn:]
            for _ in range(len(carry) + 2):
                _, lv = self.walk(lay.body.jaxpr, views[cn:], levels[cn:cn + bn] + carry,
                                  sub, "while_loop")
                new = [max(a, b) for a, b in zip(carry, lv)]
                if new == carry:
                    break
                carry = new
            top = max([top] + carry)
        return [(None, top)] * len(eqn.outvars)


def analyze_layers(closed_jaxpr: Any, paths: Sequence[str], shapes: Sequence[tuple],
                   selected: Sequence[bool]) -> Layers:
    """Sites, layers and stages of the selected leaves (the first
    ``len(paths)`` inputs of ``closed_jaxpr``)."""
    jaxpr = closed_jaxpr.jaxpr
    n = len(paths)
    views = [leaf_view(k, shapes[k]) if selected[k] else None for k in range(n)]
    views += [None] * (len(jaxpr.invars) - n)
    w = _Walker(paths)
    w.walk(jaxpr, views, [0] * len(jaxpr.invars), ())
    sites = {k: list(d.values()) for k, d in w.sites.items()}
    return Layers(sites, w.stage, w.lost)
