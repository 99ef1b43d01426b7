"""Find attention-head groups of a transformer block and remove whole heads.

Run: python examples/structured_attention_heads.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune import structured as st


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=8, qkv_features=64)(nn.LayerNorm()(x))
        h = nn.Dense(256)(nn.LayerNorm()(x))
        return x + nn.Dense(64)(nn.gelu(h))


def is_head_dim(group):
    # A head_dim group is the last axis of the 3-D query/key/value kernels;
    # keep it whole so that only whole heads are removed.
    return any(p.endswith(("query/kernel", "key/kernel", "value/kernel")) and a == 2
               for p, a in group.members)


def main():
    block = Block()
    x = jax.random.normal(jax.random.key(0), (2, 16, 64))
    v = block.init(jax.random.key(1), x)
    for g in st.groups(block.apply, v, x):
        print(g, end="\n\n")
    result = st.prune_channels(block, v, x, sparsity=0.5, ignore=is_head_dim)
    q = result.variables["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    print("query kernel (in, heads, head_dim):", q.shape)
    masked = block.apply(st.zero_removed(v, result.plan), x)
    print("max |shrunk - masked| =", float(jnp.abs(result.apply(result.variables, x) - masked).max()))


if __name__ == "__main__":
    main()
