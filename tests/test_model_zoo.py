"""The model zoo: structured pruning on model code of the families people train
(issue 9's proof), in Linen and NNX.

Every model has tiny widths and random weights with every norm's scale, bias
and running statistics perturbed, so that equality means something. For each:
groups are found, the shrunk forward equals its reference under the chosen
semantics (masked by default: ``model.apply(zero_removed(variables, plan), x)``;
native with ``rebuild=``: the model class built at the reduced widths) within
1e-5 of the output scale, in eval and in train mode; ``.module`` / ``.model``
agree with ``.apply``; gradients flow; the parameter count is the plan's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo_linen as L
import zoo_nnx as N
from jaxprune import structured as st
from jaxprune import tree as jtree
from jaxprune.structured import flax as fx

IMG = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
IDS = jnp.array([[3, 5, 7, 1, 2, 9], [4, 4, 8, 11, 1, 6]])
SRC = jnp.array([[5, 2, 9, 3, 1, 0], [7, 7, 1, 4, 0, 0]])


# ---------------------------------------------------------------- harness
def random_variables(abstract, seed: int = 1):
    """Random values for an abstract variables tree (NumPy: no kernel compiled
    per shape): kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.3^2), biases
    and running means N(0, 0.3^2), running variances 0.5 + |N(0, 0.3^2)|, so
    that every norm's scale, bias and statistics differ from their init."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for path, x in flat:
        name = jtree.path_str(path).split("/")[-1]
        if not jnp.issubdtype(x.dtype, jnp.floating):
            out.append(jax.device_put(np.zeros(x.shape, x.dtype)))
            continue
        noise = rng.normal(0.0, 0.3, x.shape)
        if len(x.shape) >= 2:
            y = rng.normal(0.0, 1.0, x.shape) / np.sqrt(max(1, np.prod(x.shape[:-1])))
        elif name == "var":
            y = 0.5 + np.abs(noise)
        elif name == "scale":
            y = 1.0 + noise
        else:
            y = noise
        out.append(jax.device_put(np.asarray(y, x.dtype)))
    return jax.tree.unflatten(treedef, out)


def close(got, want):
    """max |got - want| <= 1e-5 * max(1, |want|), leaf by leaf."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        scale = max(1.0, float(np.abs(w).max()))
        assert float(np.abs(g - w).max()) <= 1e-5 * scale, float(np.abs(g - w).max())


def planned_count(variables, plan) -> int:
    pos = st.kept_positions(plan)
    total = 0
    for path, x in jtree.leaves_with_paths(variables):
        shape = [len(pos[(path, a)]) if (path, a) in pos else n for a, n in enumerate(np.shape(x))]
        total += int(np.prod(shape))
    return total


def first(out):
    return out[0] if isinstance(out, tuple) else out


def check_common(r, full_variables):
    assert r.groups and r.params_after < r.params_before
    assert r.params_after == planned_count(full_variables, r.plan) == st.param_count(r.variables)


def check_gradients(apply, variables, inputs, params_key=None):
    """Gradients of the shrunk forward are finite and reach the weights."""
    def loss(p):
        v = p if params_key is None else {**variables, params_key: p}
        return jnp.sum(first(apply(v, *inputs)) ** 2)
    grads = jax.grad(loss)(variables if params_key is None else variables[params_key])
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(np.abs(np.asarray(g)).sum()) for g in leaves) > 0


# ---------------------------------------------------------------- Linen
@functools.lru_cache(maxsize=None)
def linen_case(name: str):
    """(module, perturbed variables, inputs, apply kwargs, init kwargs) per zoo entry."""
    cases = {
        "resnet": (L.ResNet(), (IMG,), {"train": False}),
        "resnet_train": (L.ResNet(), (IMG,), {"train": True, "mutable": ["batch_stats"]}),
        "lm": (L.TransformerLM(L.TransformerConfig()), (IDS,), {}),
        "lm_train": (L.TransformerLM(L.TransformerConfig(deterministic=False)), (IDS,),
                     {"rngs": {"dropout": jax.random.key(9)}}),
        "lm_sinusoidal": (L.TransformerLM(L.TransformerConfig(learned_pos=False)), (IDS,), {}),
        "encdec": (L.EncoderDecoder(L.TransformerConfig()), (SRC, IDS), {}),
        "vit_token": (L.ViT(), (IMG,), {}),
        "vit_gap": (L.ViT(classifier="gap"), (IMG,), {}),
        "vit_gap_train": (L.ViT(classifier="gap", deterministic=False), (IMG,),
                          {"rngs": {"dropout": jax.random.key(9)}}),
        "mixer": (L.Mixer(), (IMG,), {}),
        "convnext": (L.ConvNeXt(), (IMG,), {}),
        "mbconv": (L.MobileNet(), (IMG,), {}),
        "mbconv_train": (L.MobileNet(train=True), (IMG,), {"mutable": ["batch_stats"]}),
        "unet": (L.UNet(), (IMG,), {}),
        "llama": (L.Llama(), (IDS,), {}),
    }
    module, inputs, kw = cases[name]
    init_kw = {"train": False} if "train" in kw else {}
    abstract = jax.eval_shape(lambda k: module.init(k, *inputs, **init_kw), jax.random.key(0))
    return module, random_variables(abstract), inputs, kw


@functools.lru_cache(maxsize=None)
def linen_result(name: str):
    module, v, inputs, kw = linen_case(name)
    # Dropout: the masked model's very bits (the default draws the kept ones
    # only, equal in distribution), so that equality is exact.
    bits = "exact" if "rngs" in kw else "reduced"
    return st.prune_channels(module, v, *inputs, sparsity=0.5, apply_kwargs=kw, random_bits=bits)


def check_linen(name: str):
    module, v, inputs, kw = linen_case(name)
    r = linen_result(name)
    check_common(r, v)
    want = jax.jit(lambda v, *x: module.apply(v, *x, **kw))(st.zero_removed(v, r.plan), *inputs)
    got = r.apply(r.variables, *inputs)
    if "mutable" in kw:  # (output, updated statistics): compare the kept slices of the state
        want = (want[0], st.slice_variables(want[1], r.plan))
    close(got, want)
    mutable = {"mutable": kw["mutable"]} if "mutable" in kw else {}
    close(r.module.apply(r.variables, *inputs, **mutable), got)
    check_gradients(r.apply, r.variables, inputs, "params")
    return r


LINEN_FAST = ["resnet", "lm", "encdec", "vit_gap", "mixer", "convnext", "mbconv", "unet", "llama"]
LINEN_SLOW = ["resnet_train", "lm_train", "vit_gap_train", "mbconv_train"]


@pytest.mark.parametrize("name", LINEN_FAST)
def test_linen_zoo_shrinks_to_the_masked_model(name):
    check_linen(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LINEN_SLOW)
def test_linen_zoo_train_mode_shrinks_to_the_masked_model(name):
    check_linen(name)


def test_linen_vit_with_class_token():
    check_linen("vit_token")


def test_linen_lm_with_sinusoidal_positions():
    check_linen("lm_sinusoidal")


def test_learned_position_rows_are_not_a_group():
    r = linen_result("lm")
    pos = "params/Decoder_0/AddPositionEmbs_0/pos_embedding"
    assert not any((pos, 1) in g.members for g in r.groups)


def test_lm_ties_input_and_output_embeddings_and_prunes_heads_and_width():
    r = linen_result("lm")
    p = r.variables["params"]
    assert p["Embed_0"]["embedding"].shape == (23, 8)  # tied: one width for both uses
    q = p["Decoder_0"]["DecoderBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert q.shape == (8, 2, 2)  # residual 16 -> 8, heads 4 -> 2, head_dim 4 -> 2


def _resnet_named_axis(module, v, x):
    """BatchNorm statistics averaged over a named batch axis (as under pmap)."""
    def one(xs):
        return module.apply(v, xs, train=True, mutable=["batch_stats"])
    out, state = jax.vmap(one, axis_name="batch")(x.reshape(2, 1, *x.shape[1:]))
    return out.reshape(-1, out.shape[-1]), jax.tree.map(lambda s: s[0], state)


@pytest.mark.slow
def test_linen_resnet_train_mode_under_a_named_batch_axis():
    module, v, (x,), _ = linen_case("resnet")
    fn = functools.partial(_resnet_named_axis, L.ResNet(axis_name="batch"))
    r = st.prune_channels(lambda v, x: fn(v, x), v, x, sparsity=0.5)
    check_common(r, v)
    want = fn(st.zero_removed(v, r.plan), x)
    close(r.apply(r.variables, x), (want[0], st.slice_variables(want[1], r.plan)))
    check_gradients(r.apply, r.variables, (x,), "params")


@pytest.mark.slow
def test_linen_resnet_train_mode_under_pmap():
    module, v, (x,), _ = linen_case("resnet")
    model = L.ResNet(axis_name="batch")

    def fn(v, x):
        out, state = jax.pmap(lambda xs: model.apply(v, xs, train=True, mutable=["batch_stats"]),
                              axis_name="batch")(x.reshape(2, 1, *x.shape[1:]))
        return out.reshape(-1, out.shape[-1]), jax.tree.map(lambda s: s[0], state)
    r = st.prune_channels(fn, v, x, sparsity=0.5)
    want = fn(st.zero_removed(v, r.plan), x)
    close(r.apply(r.variables, x), (want[0], st.slice_variables(want[1], r.plan)))


# ---------------------------------------------------------------- NNX
NNX_MODELS = {
    "resnet": (lambda: N.ResNet(rngs=nnx.Rngs(0)), (IMG,)),
    "lm": (lambda: N.LM(rngs=nnx.Rngs(0)), (IDS,)),
    "encdec": (lambda: N.EncDec(rngs=nnx.Rngs(0)), (SRC, IDS)),
    "vit_gap": (lambda: N.ViT(rngs=nnx.Rngs(0)), (IMG,)),
    "vit_token": (lambda: N.ViT(gap=False, rngs=nnx.Rngs(0)), (IMG,)),
    "mixer": (lambda: N.Mixer(rngs=nnx.Rngs(0)), (IMG,)),
    "convnext": (lambda: N.ConvNeXt(rngs=nnx.Rngs(0)), (IMG,)),
    "mbconv": (lambda: N.MBConv(rngs=nnx.Rngs(0)), (IMG,)),
    "unet": (lambda: N.UNet(rngs=nnx.Rngs(0)), (IMG,)),
    "gemma": (lambda: N.Gemma(rngs=nnx.Rngs(0)), (IDS,)),
}


def nnx_model(name: str, train: bool = False):
    make, inputs = NNX_MODELS[name]
    graphdef, state = nnx.split(nnx.eval_shape(make))
    nnx.replace_by_pure_dict(state, random_variables(nnx.to_pure_dict(state)))
    model = nnx.merge(graphdef, state)
    model.train() if train else model.eval()
    return model, inputs


def check_nnx(name: str, train: bool = False):
    model, inputs = nnx_model(name, train)
    fn, pure, _ = fx.nnx_functional(model)
    r = st.prune_channels(model, *inputs, sparsity=0.5)
    check_common(r, pure)
    want = jax.jit(fn)(st.zero_removed(pure, r.plan), *inputs)[0]
    got = r.apply(r.variables, *inputs)
    close(got, want)
    close(r.model(*inputs), got)
    grads = nnx.grad(lambda m: jnp.sum(m(*inputs) ** 2))(r.model)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(np.abs(np.asarray(g)).sum()) for g in leaves) > 0
    return r


NNX_FAST = ["resnet", "lm", "vit_gap", "mixer", "convnext", "unet"]
NNX_SLOW = ["encdec", "mbconv"]


@pytest.mark.parametrize("name", NNX_FAST)
def test_nnx_zoo_shrinks_to_the_masked_model(name):
    check_nnx(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NNX_SLOW)
def test_nnx_zoo_more_shrink_to_the_masked_model(name):
    check_nnx(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mbconv"])
def test_nnx_zoo_train_mode_batch_statistics(name):
    check_nnx(name, train=True)


def test_nnx_vit_with_class_token():
    check_nnx("vit_token")


def test_nnx_gemma_masked_and_rebuilt_native():
    check_nnx("gemma")
    model, (ids,) = nnx_model("gemma")
    r = st.prune_channels(model, ids, sparsity=0.5, rebuild=N.Gemma.rebuild)
    assert type(r.model) is N.Gemma and r.plan["semantics"] == "native"
    close(r.model(ids), r.apply(r.variables, ids))


def test_nnx_lm_rebuilt_at_the_reduced_widths_agrees_with_apply():
    model, (ids,) = nnx_model("lm")

    def rebuild(v):
        b = v["blocks"][0]
        d = v["embed"]["embedding"].shape[1]
        heads, hd = b["attn"]["query"]["kernel"].shape[1:]
        return N.LM(23, d, heads, heads * hd, b["up"]["kernel"].shape[1], len(v["blocks"]),
                    v["pos"].shape[1], rngs=nnx.Rngs(3))
    r = st.prune_channels(model, ids, sparsity=0.5, rebuild=rebuild)
    assert type(r.model) is N.LM and r.plan["semantics"] == "native"
    close(r.model(ids), r.apply(r.variables, ids))
    check_gradients(r.apply, r.variables, (ids,))
