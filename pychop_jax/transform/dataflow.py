"""Finding weights by dataflow: which parameters reach which matmul operand.

``analyze(closed_jaxpr, paths)`` walks a traced function whose first ``len(paths)``
inputs are its parameters and follows every parameter through its views
(``views.STRUCTURAL``) into the sub-jaxprs of ``jit``, ``remat`` / ``checkpoint``,
``custom_jvp`` / ``custom_vjp`` functions, ``cond`` branches, ``while`` bodies and
``scan`` bodies (where a stacked parameter arrives as its per-iteration slice).  It
returns a ``Graph``: the ``Site`` s -- the equations where something can be
quantized -- and, per parameter that reaches one, a ``Weight``.

Sites, by kind:

* ``"weight"``: a ``dot_general`` with exactly one operand a view of a parameter (on
  either side), or a ``conv_general_dilated`` whose kernel is one.  The parameter axes
  its dimension numbers contract are the site's ``contracted`` axes;
* ``"lookup"``: a ``gather`` of rows of a parameter by data-dependent indices (an
  embedding lookup); its ``contracted`` axes are the table's non-gathered (feature)
  axes, which is what a tied output projection ``x @ table.T`` contracts;
* ``"product"``: a ``dot_general`` of two activations (attention's ``q k^T`` and
  ``probs v``).  Its module is the longest common module path of the weight sites
  whose outputs reach its operands (``q`` from ``attn/query``, ``k`` from ``attn/key``:
  ``attn``);
* ``"cache"``: a ``dynamic_update_slice`` into a model-state input (a collection the
  model writes, e.g. linen's ``cache``) -- a KV cache, whose contents the attention
  products then read; a rule's ``kv_cache`` quantizes what is written;
* ``"float"``: a matmul that stays float whatever the rules say, with the reason (both
  operands are parameters; a parameter reaches it through an operation that computes
  with it; it sits inside a primitive the transform does not enter).

A parameter used by several sites (a tied embedding: a lookup and an output
projection) is one ``Weight`` with several uses.  Norm scales, biases and constants
reach no site and are not weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.extend.core import Literal

from . import views

__all__ = ["Prov", "Site", "Weight", "Graph", "analyze", "MATMULS", "HIGHER_ORDER",
           "module_of", "common_module"]

MATMULS = ("dot_general", "conv_general_dilated")
#: higher-order primitives the transform enters (re-emitted by ``interpret``)
HIGHER_ORDER = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                "custom_jvp_call", "custom_vjp_call", "cond", "while", "scan")


@dataclasses.dataclass(frozen=True)
class Prov:
    """A value that is a view of parameter ``weight``: for each of its axes, the
    parameter axes it spans; ``scanned``: the parameter axes enclosing scans slice
    (the value is one iteration's slice along them); ``indexed``: the callpath of the
    first ``gather`` / ``dynamic_slice`` with computed indices on the way (``w[i]`` or
    ``table[ids]``: which of the two, its use tells)."""

    weight: int
    axes: tuple[tuple[int, ...], ...]
    scanned: tuple[int, ...] = ()
    indexed: tuple | None = None


@dataclasses.dataclass
class Site:
    """An equation where something can be quantized (see the module docstring).

    Attributes:
      callpath: where the equation is: its index in the top jaxpr, then for each
        enclosing higher-order equation the sub-jaxpr taken and the index in it.
      primitive: ``"dot_general"``, ``"conv_general_dilated"``, ``"gather"`` /
        ``"dynamic_slice"`` (lookups) or ``"dynamic_update_slice"`` (cache writes).
      kind: ``"weight"``, ``"lookup"``, ``"product"``, ``"cache"`` or ``"float"``.
      eqn: the equation.
      module: the module path the rules match (a weight's parent path).
      weight: the parameter index (weight and lookup sites).
      operand: which operand is the parameter (0 or 1).
      view: the weight operand's axis map (its axes -> parameter axes).
      scanned: the parameter axes the enclosing scans slice (a stacked layer axis).
      contracted: the parameter axes the equation contracts.
      stack: lengths of the enclosing scans, outermost first: the site's state is
        stacked along them.
      loop: whether the site is inside a ``while`` loop (one state for all iterations).
      reason: why a float site stays float.
      input: the activation operand's identity in its jaxpr (sites fed the same array
        share it), or ``None``.
      index: position among the matmul sites of the same weight (its ``n``-th matmul
        use; lookups count apart) or among the products of the same module.
      state: a cache site's model-state input (its position among the inputs).
      cached: the operands of a product that read a written cache.
    """

    callpath: tuple
    primitive: str
    kind: str
    eqn: Any
    module: str = ""
    weight: int | None = None
    operand: int | None = None
    view: tuple = ()
    scanned: tuple[int, ...] = ()
    contracted: tuple[int, ...] = ()
    stack: tuple[int, ...] = ()
    loop: bool = False
    reason: str = ""
    input: Any = None
    index: int = 0
    state: int | None = None
    cached: tuple[int, ...] = ()

    @property
    def shapes(self) -> tuple:
        return tuple(tuple(v.aval.shape) for v in self.eqn.invars[:2])

    @property
    def activation(self) -> int | None:
        """The activation operand's position (``None`` for products and lookups)."""
        if self.kind != "weight":
            return None
        return 1 - self.operand


@dataclasses.dataclass
class Weight:
    """A parameter that reaches at least one weight or lookup site."""

    index: int
    path: str
    shape: tuple[int, ...]
    dtype: Any
    uses: list = dataclasses.field(default_factory=list)

    @property
    def module(self) -> str:
        return module_of(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def contracted(self) -> tuple[int, ...]:
        """The parameter axes any of its uses contracts (sorted)."""
        return tuple(sorted({a for u in self.uses for a in u.contracted}))

    @property
    def free(self) -> tuple[int, ...]:
        """The other axes: its output channels (a stacked layer axis among them)."""
        return tuple(a for a in range(len(self.shape)) if a not in self.contracted)


@dataclasses.dataclass
class Graph:
    """What ``analyze`` found (see the module docstring)."""

    jaxpr: Any
    paths: tuple[str, ...]
    sites: list[Site]
    weights: dict[int, Weight]
    active: frozenset
    state_paths: dict = dataclasses.field(default_factory=dict)
    cache_outputs: dict = dataclasses.field(default_factory=dict)

    def site_at(self, callpath) -> Site | None:
        return self._by_path.get(callpath)

    def __post_init__(self):
        self._by_path = {s.callpath: s for s in self.sites}

    def weight_sites(self):
        return [s for s in self.sites if s.kind in ("weight", "lookup")]

    def cache_sites(self) -> list[Site]:
        """The writes into float model-state inputs (caches)."""
        return [s for s in self.sites if s.kind == "cache"]


def module_of(path: str) -> str:
    """A parameter's module: its path without the last component."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def common_module(modules) -> str:
    """The longest common prefix, by path components, of module paths."""
    parts = [m.split("/") if m else [] for m in modules]
    if not parts:
        return ""
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return "/".join(common)


def _sub(eqn):
    """``(sub-jaxprs, consts of each)`` of a higher-order equation, as open jaxprs."""
    p = eqn.params
    name = eqn.primitive.name
    if name == "cond":
        return [(b.jaxpr, b.consts) for b in p["branches"]]
    if name == "while":
        return [(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts),
                (p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts)]
    for key in ("jaxpr", "call_jaxpr"):
        if key in p:
            j = p[key]
            return [(j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())]
    return []


@dataclasses.dataclass(frozen=True)
class _Val:
    """What the analysis knows of a value: a view of a parameter (``prov``), the
    modules of the weight sites whose outputs reach it (``sources``), and, for a value
    computed from parameters and constants only (no input data), those parameters
    (``derived``) and the first primitive that computed with them (``via``)."""

    prov: Prov | None = None
    sources: frozenset = frozenset()
    derived: frozenset = frozenset()
    via: str = ""
    data: bool = False
    state: int | None = None  # a view of model-state input ``state`` (a cache, unwritten)
    cache: int | None = None  # that state after a write into it (a KV cache)


_CONST = _Val()
_DATA = _Val(data=True)


class _Analysis:
    def __init__(self, paths, state_paths=None):
        self.paths = paths
        self.state_paths = dict(state_paths or {})
        self.sites: list[Site] = []
        self.active: set = set()
        self.quiet = 0  # > 0: a first turn through a loop body, which records nothing
        self.indexing: dict = {}  # callpath -> (eqn, prov, stack, loop) of data indexing
        self.looked_up: set = set()

    # -- the walk ----------------------------------------------------------------------------
    def walk(self, jaxpr, ins, prefix=(), stack=(), loop=False):
        """Walk ``jaxpr`` with its invars' ``_Val`` s; returns the outvars' and whether
        anything quantizable is inside (then ``prefix`` is marked active)."""
        env = dict(zip(jaxpr.invars, ins, strict=True))
        read = lambda v: _CONST if isinstance(v, Literal) else env.get(v, _CONST)  # noqa: E731
        found = False
        for i, eqn in enumerate(jaxpr.eqns):
            outs, hit = self.equation(eqn, prefix + (i,), [read(v) for v in eqn.invars],
                                      stack, loop)
            found |= hit
            env.update(zip(eqn.outvars, outs, strict=True))
        if found:
            self.active.add(prefix)
        return [read(v) for v in jaxpr.outvars], found

    def equation(self, eqn, path, ins, stack, loop):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name in HIGHER_ORDER:
            return self.higher_order(eqn, path, ins, stack, loop)
        if ins and ins[0].prov is not None and views.is_structural(eqn):
            if name == "optimization_barrier":
                return list(ins), False
            v = ins[0]
            prov = Prov(v.prov.weight, views.map_axes(eqn, v.prov.axes), v.prov.scanned,
                        v.prov.indexed)
            if name in ("gather", "dynamic_slice") and prov.indexed is None and any(
                    not isinstance(x, Literal) for x in eqn.invars[1:]):
                prov = dataclasses.replace(prov, indexed=path)
                self.indexing.setdefault(path, (eqn, v.prov, stack, loop))
            return [dataclasses.replace(v, prov=prov)], False
        if ins and (ins[0].state is not None or ins[0].cache is not None):
            if name == "dynamic_update_slice":
                for v in ins[1:]:
                    self.consume(v)
                return self.cache_write(eqn, path, ins, stack, loop), True
            if views.is_structural(eqn):
                return [ins[0]] * len(eqn.outvars), False
        if name == "dot_general":
            return self.dot(eqn, path, ins, stack, loop)
        if name == "conv_general_dilated":
            return self.conv(eqn, path, ins, stack, loop)
        for v in ins:
            self.consume(v)
        out = _combine(ins, name)
        if _sub(eqn) and any(v.prov is not None for v in ins):
            for v in ins:
                if v.prov is not None:
                    self.float_site(eqn, path, stack, loop, self.paths[v.prov.weight],
                                    f"the parameter enters {name}, which the transform does "
                                    "not enter")
            return [out] * n_out, True
        return [out] * n_out, False

    # -- sites ----------------------------------------------------------------------------
    def add(self, site: Site) -> Site:
        if not self.quiet:
            self.sites.append(site)
        return site

    def loop_body(self, walk, carry, settle):
        """Walk a loop body twice: a quiet turn whose outputs extend the carry's
        sources (``settle``), then the recorded one."""
        self.quiet += 1
        try:
            res, _ = walk(carry)
        finally:
            self.quiet -= 1
        return walk(settle(carry, res))

    def float_site(self, eqn, path, stack, loop, where, reason):
        self.add(Site(path, eqn.primitive.name, "float", eqn, module=module_of(where),
                      stack=stack, loop=loop, reason=reason))

    def computed(self, eqn, path, ins, stack, loop) -> bool:
        """A float site for a matmul operand computed from parameters (not a view);
        returns whether there was one."""
        for v in ins[:2]:
            if v.derived and not v.data and v.prov is None:
                names = ", ".join(sorted(self.paths[w] for w in v.derived))
                self.float_site(eqn, path, stack, loop, self.paths[min(v.derived)],
                                f"parameter(s) {names} reach it through {v.via}, which "
                                "computes with them (only views -- transpose, reshape, "
                                "astype, slicing, broadcasting -- keep a weight)")
                return True
        return False

    def weight_site(self, eqn, path, prov, operand, contracting, stack, loop, kind="weight",
                    input_id=None):
        contracted = tuple(sorted({a for d in contracting for a in prov.axes[d]}))
        wpath = self.paths[prov.weight]
        return self.add(Site(path, eqn.primitive.name, kind, eqn, module=module_of(wpath),
                             weight=prov.weight, operand=operand, view=prov.axes,
                             scanned=prov.scanned, contracted=contracted, stack=stack,
                             loop=loop, input=input_id))

    def cache_write(self, eqn, path, ins, stack, loop):
        """A write into a float model-state input (``dynamic_update_slice``): a cache
        site, quantizable by a rule's ``kv_cache``; the products reading the written
        cache are marked (``Site.cached``)."""
        state = ins[0].state if ins[0].state is not None else ins[0].cache
        where = self.state_paths.get(state, "")
        self.add(Site(path, "dynamic_update_slice", "cache", eqn,
                      module=module_of(where), stack=stack, loop=loop, state=state))
        sources = frozenset().union(*(v.sources for v in ins))
        return [_Val(sources=sources, data=True, cache=state)]

    def dot(self, eqn, path, ins, stack, loop):
        (lc, rc), _ = eqn.params["dimension_numbers"]
        ins = list(ins)
        pl, pr = ins[0].prov, ins[1].prov
        if pl is not None and pr is not None and (pl.indexed is None) != (pr.indexed is None):
            i = 0 if pl.indexed is not None else 1  # a lookup's rows times a weight
            self.consume(ins[i])
            ins[i] = _Val(sources=ins[i].sources, data=True)
            pl, pr = ins[0].prov, ins[1].prov
        if pl is not None and pr is not None:
            self.float_site(eqn, path, stack, loop, self.paths[pr.weight],
                            f"both operands are parameters ({self.paths[pl.weight]}, "
                            f"{self.paths[pr.weight]})")
            return [_Val(derived=frozenset({pl.weight, pr.weight}), via="dot_general")], True
        if pl is None and pr is None:
            if self.computed(eqn, path, ins, stack, loop):
                return [_combine(ins, "dot_general")], True
            module = common_module(ins[0].sources | ins[1].sources)
            cached = tuple(i for i in (0, 1) if ins[i].cache is not None)
            site = self.add(Site(path, "dot_general", "product", eqn, module=module,
                                 stack=stack, loop=loop, cached=cached))
            return [_Val(sources=frozenset({site.module}), data=True)], True
        operand = 0 if pl is not None else 1
        prov = pl if pl is not None else pr
        site = self.weight_site(eqn, path, prov, operand, lc if operand == 0 else rc, stack,
                                loop, input_id=(path[:-1], eqn.invars[1 - operand]))
        return [_Val(sources=frozenset({site.module}), data=True)], True

    def conv(self, eqn, path, ins, stack, loop):
        pl, pr = ins[0].prov, ins[1].prov
        if pl is not None and pl.indexed is not None and pr is not None:
            self.consume(ins[0])
            pl = None
        if pl is not None:
            self.float_site(eqn, path, stack, loop, self.paths[pl.weight],
                            "a parameter is the convolution's input, not its kernel")
            return [_combine(ins, "conv_general_dilated")], True
        if pr is None:
            hit = self.computed(eqn, path, ins, stack, loop)
            return [_combine(ins, "conv_general_dilated")], hit
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        contracting = [d for d in range(len(pr.axes)) if d != out_feature]
        site = self.weight_site(eqn, path, pr, 1, contracting, stack, loop,
                                input_id=(path[:-1], eqn.invars[0]))
        return [_Val(sources=frozenset({site.module}), data=True)], True

    def consume(self, v: _Val) -> None:
        """``v`` is used as a value (not as a matmul's weight): if it was indexed out of
        a parameter (``table[ids]``), that indexing is a lookup site."""
        if v.prov is None or v.prov.indexed is None or self.quiet:
            return
        path = v.prov.indexed
        if path in self.looked_up:
            return
        self.looked_up.add(path)
        eqn, prov, stack, loop = self.indexing[path]
        shape = eqn.invars[0].aval.shape
        if eqn.primitive.name == "gather":
            indexed = views.gathered_axes(eqn.params, shape)
        else:  # dynamic_slice: the axes it does not take whole
            indexed = {d for d, n in enumerate(eqn.params["slice_sizes"]) if n < shape[d]}
        features = [d for d in range(len(shape)) if d not in indexed]
        self.weight_site(eqn, path, prov, 0, features, stack, loop, kind="lookup")

    def strip(self, v: _Val) -> _Val:
        """``_strip`` after ``consume``: a loop carry or branch result is a value."""
        self.consume(v)
        return _strip(v)

    # -- higher-order primitives --------------------------------------------------------------
    def higher_order(self, eqn, path, ins, stack, loop):
        name, p = eqn.primitive.name, eqn.params
        n_out = len(eqn.outvars)
        carried = any(v.prov is not None for v in ins)
        subs = _sub(eqn)
        if name == "cond":
            found, outs = False, [_CONST] * n_out
            for b, (j, _) in enumerate(subs):
                res, hit = self.walk(j, ins[1:], path + (b,), stack, loop)
                found |= hit
                outs = [_merge(a, c) for a, c in zip(outs, res, strict=True)]
            outs = [self.strip(v) for v in outs]
        elif name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            settle = lambda c, r: [self.strip(_merge(a, b)) for a, b in zip(c, r, strict=True)]  # noqa: E731
            carry = [self.strip(v) for v in ins[nc + nb:]]
            res, found = self.loop_body(
                lambda c: self.walk(subs[1][0], ins[nc:nc + nb] + c, path + (1,), stack, True),
                carry, settle)
            carry = settle(carry, res)
            _, hit = self.walk(subs[0][0], ins[:nc] + carry, path + (0,), stack, True)
            found |= hit
            outs = carry
        elif name == "scan":
            nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
            xs = [v if v.prov is None else dataclasses.replace(
                v, prov=Prov(v.prov.weight, v.prov.axes[1:],
                             v.prov.scanned + v.prov.axes[0])) for v in ins[nc + nk:]]
            settle = lambda c, r: [self.strip(_merge(a, b)) for a, b in zip(c, r[:nk], strict=True)]  # noqa: E731
            carry = [self.strip(v) for v in ins[nc:nc + nk]]
            res, found = self.loop_body(
                lambda c: self.walk(subs[0][0], ins[:nc] + c + xs, path + (0,),
                                    stack + (length,), loop), carry, settle)
            outs = settle(carry, res) + [self.strip(v) for v in res[nk:]]
        else:  # jit, remat, custom_jvp / custom_vjp: the body, inputs one to one
            outs, found = self.walk(subs[0][0], ins, path + (0,), stack, loop)
            if name.startswith("custom"):
                outs = [self.strip(v) for v in outs]
        if found or carried:
            self.active.add(path)
        return outs, found or carried


def _combine(ins, name) -> _Val:
    """A value computed by primitive ``name`` from ``ins``."""
    data = any(v.data for v in ins)
    sources = frozenset().union(*(v.sources for v in ins)) if ins else frozenset()
    if data:
        return _Val(sources=sources, data=True)
    derived = frozenset().union(*(v.derived for v in ins), {v.prov.weight for v in ins
                                                            if v.prov is not None})
    via = next((v.via for v in ins if v.via), name) if derived else ""
    return _Val(sources=sources, derived=derived, via=via)


def _merge(a: _Val, b: _Val) -> _Val:
    return _Val(sources=a.sources | b.sources, derived=a.derived | b.derived,
                via=a.via or b.via, data=a.data or b.data)


def _strip(v: _Val) -> _Val:
    """``v`` without its provenance (a loop carry or a branch result is not a view)."""
    if v.prov is None:
        return v
    return _Val(sources=v.sources, derived=v.derived | {v.prov.weight}, via=v.via or "a loop",
                data=v.data)


def analyze(closed_jaxpr, paths, shapes=None, dtypes=None, state_paths=None) -> Graph:
    """The ``Graph`` of a traced function whose first ``len(paths)`` inputs are its
    parameters (``paths``: their names, ``"/"``-joined); ``state_paths``: ``{input
    position: name}`` of the model-state inputs among the others (caches)."""
    jaxpr = closed_jaxpr.jaxpr
    n = len(paths)
    avals = [v.aval for v in jaxpr.invars]
    shapes = shapes or [tuple(a.shape) for a in avals[:n]]
    dtypes = dtypes or [a.dtype for a in avals[:n]]
    state_paths = dict(state_paths or {})
    analysis = _Analysis(tuple(paths), state_paths)
    ins = [_Val(prov=Prov(i, tuple((d,) for d in range(len(a.shape)))))
           if i < n and _is_float(a.dtype) else _CONST if i < n
           else _Val(data=True, state=i) if i in state_paths and _is_float(a.dtype) else _DATA
           for i, a in enumerate(avals)]
    outs, _ = analysis.walk(jaxpr, ins)
    for v in outs:  # what the function returns is a value
        analysis.consume(v)
    caches = {o: v.cache for o, v in enumerate(outs) if v.cache is not None}
    weights: dict[int, Weight] = {}
    modules: dict[str, int] = {}
    for site in analysis.sites:
        if site.kind in ("weight", "lookup"):
            w = weights.setdefault(site.weight, Weight(site.weight, paths[site.weight],
                                                        tuple(shapes[site.weight]),
                                                        dtypes[site.weight]))
            site.index = sum(u.kind == site.kind for u in w.uses)
            w.uses.append(site)
        elif site.kind == "product":
            site.index = modules.get(site.module, 0)
            modules[site.module] = site.index + 1
    return Graph(closed_jaxpr, tuple(paths), analysis.sites, weights,
                 frozenset(analysis.active), state_paths, caches)


def _is_float(dtype) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(dtype, jnp.floating)
