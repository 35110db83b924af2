"""A small xLSTM-style character language model trained with `pallas_mlstm.mlstm_chunkwise`, then sampled.

What it shows:
  * an mLSTM block (pre-norm, up-projection, q/k/v and gate projections, the chunkwise mLSTM cell, a head-wise
    norm, an output gate, a down-projection and a residual) in plain JAX: no flax, no optax;
  * data-parallel x context-parallel training on a device mesh: the batch is sharded over the mesh axis "data"
    and the sequence over "seq", so each device holds a (B / data, S / seq) block of tokens; `mlstm_chunkwise`
    runs on each device's piece of the sequence and passes the cell states between the "seq" shards itself;
  * generation: a prefill of the prompt with `mlstm_chunkwise(..., return_last_states=True)`, then one token at
    a time with `mlstm_recurrent_step` from those states, which continues the sequence exactly.

Run it (a CPU poses as 4 devices; on a GPU machine the mesh is made of its GPUs):

    python examples/train_lm.py                    # 300 steps: about a minute on a 2-core CPU
    python examples/train_lm.py --steps 100 --seed 1 --backend xla

Shapes: B batch, S sequence, D model width, I inner width (proj_factor * D), NH heads, DH = I / NH head width,
V vocabulary size.
"""

import os

# Before JAX starts: let a CPU pose as 4 devices, so that the mesh below has something to shard over.
# (Only the CPU platform reads this flag; on a GPU machine the mesh is made of the GPUs, and this changes nothing.)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pallas_mlstm  # noqa: E402

# ----------------------------------------------------------------------------------------------------- data

CORPUS_MODULES = ("argparse", "dataclasses", "functools", "string", "textwrap")


def load_corpus(modules=CORPUS_MODULES) -> str:
    """The text to learn: the source code of a few pure-Python standard-library modules (it ships with Python)."""
    return "\n".join(inspect.getsource(importlib.import_module(name)) for name in modules)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Characters <-> token ids."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: n for n, c in enumerate(self.chars)}
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(n)] for n in ids)


def random_windows(data: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
    """`batch` random windows of the token array: inputs and next-token targets, each (B, S) int32."""
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    windows = np.stack([data[s : s + seq_len + 1] for s in starts])  # (B, S + 1)
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Config:
    """Model sizes and the options of the mLSTM cell. Frozen (hashable): jit takes it as a static argument."""

    vocab_size: int  # V
    d_model: int = 64  # D
    num_layers: int = 2
    num_heads: int = 4  # NH
    proj_factor: int = 2  # I = proj_factor * D
    # the cell's chunk size; None: mlstm_chunkwise's default, which divides each device's piece of the sequence
    chunk_size: int | None = None
    backend: str | None = None  # the cell's backend; None: triton on a GPU, xla otherwise

    @property
    def inner(self) -> int:  # I
        return self.proj_factor * self.d_model


def init_params(cfg: Config, seed: int = 0) -> dict:
    """Random parameters: a pytree (nested dict) of float32 NumPy arrays (NumPy: no compilation for a few
    random draws; `train` puts them on the devices)."""
    D, I, NH, V = cfg.d_model, cfg.inner, cfg.num_heads, cfg.vocab_size
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
    dense = lambda fan_in, fan_out, scale=1.0: normal(fan_in, fan_out, scale=scale / np.sqrt(fan_in))
    ones = lambda n: np.ones(n, np.float32)
    blocks = [
        {
            "norm": ones(D),
            "w_up": dense(D, 2 * I),  # -> the cell's input and the output gate's input
            "w_q": dense(I, I),
            "w_k": dense(I, I),
            "w_v": dense(I, I),
            "w_gates": dense(I, 2 * NH, scale=0.1),  # -> the i and f pre-activations, one each per head
            # Input gate bias 0; forget gate bias from 3 to 6 over the heads (σ(3..6) = 0.95..0.998), as in
            # xLSTM: every head starts out remembering, each over a span of its own.
            "b_gates": np.concatenate([np.zeros(NH), np.linspace(3.0, 6.0, NH)]).astype(np.float32),
            "head_norm": ones(I),  # the scales of the head-wise norm, one per channel
            "w_down": dense(I, D, scale=1 / np.sqrt(2 * cfg.num_layers)),
        }
        for _ in range(cfg.num_layers)
    ]
    return {"embed": normal(V, D), "blocks": blocks, "final_norm": ones(D), "w_out": dense(D, V)}


def rms_norm(x, scale, eps=1e-6):
    """RMS norm over the last axis, times a learned scale."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def embed(params: dict, tokens):
    """Token ids (B, S) -> vectors (B, S, D). A one-hot matmul rather than a gather (`embed[tokens]`): on Explicit
    mesh axes its result takes the tokens' sharding by itself, where a gather asks to be told its sharding."""
    return jax.nn.one_hot(tokens, params["embed"].shape[0]) @ params["embed"]


def cell_inputs(block: dict, x, num_heads: int):
    """The first half of an mLSTM block, x (B, S, D) -> the cell's q, k, v (B, NH, S, DH), its gate
    pre-activations i, f (B, NH, S), and z (B, S, I), the input of the output gate."""
    batch, seq_len, _ = x.shape
    x_cell, z = jnp.split(rms_norm(x, block["norm"]) @ block["w_up"], 2, axis=-1)  # (B, S, I) each
    heads = lambda y: y.reshape(batch, seq_len, num_heads, -1).transpose(0, 2, 1, 3)  # (B, S, I) -> (B, NH, S, DH)
    q, k, v = (heads(x_cell @ block[name]) for name in ("w_q", "w_k", "w_v"))
    gates = (x_cell @ block["w_gates"] + block["b_gates"]).transpose(0, 2, 1)  # (B, 2 NH, S)
    i, f = jnp.split(gates, 2, axis=1)  # (B, NH, S) each
    return q, k, v, i, f, z


def cell_outputs(block: dict, x, h, z, eps=1e-6):
    """The second half of an mLSTM block: the cell's output h (B, NH, S, DH) -> the block's output (B, S, D).

    A layer norm per head (which also makes the cell's gradients exact: they treat the cell's normaliser as a
    constant, see docs/numerics.md), the output gate silu(z), the down-projection and the residual."""
    batch, _, seq_len, _ = h.shape
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + eps)
    h = h.transpose(0, 2, 1, 3).reshape(batch, seq_len, -1) * block["head_norm"]  # (B, S, I)
    return x + (h * jax.nn.silu(z)) @ block["w_down"]


def logits_of(params: dict, x):
    """The final norm and the output head: (B, S, D) -> (B, S, V)."""
    return rms_norm(x, params["final_norm"]) @ params["w_out"]


def forward(params: dict, tokens, cfg: Config):
    """Token ids (B, S) -> next-token logits (B, S, V): every position at once, with the chunkwise mLSTM."""
    x = embed(params, tokens)  # (B, S, D)
    for block in params["blocks"]:
        q, k, v, i, f, z = cell_inputs(block, x, cfg.num_heads)
        h = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=cfg.chunk_size, backend=cfg.backend)
        x = cell_outputs(block, x, h, z)
    return logits_of(params, x)


def loss_fn(params: dict, inputs, targets, cfg: Config):
    """The mean next-character cross-entropy (in nats) of inputs and targets (B, S)."""
    log_probs = jax.nn.log_softmax(forward(params, inputs, cfg))
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


# ------------------------------------------------------------------------------------------------- training


def adam_update(params, grads, state, lr, b1=0.9, b2=0.99, eps=1e-8):
    """One Adam step; state = (step count, first moments, second moments)."""
    count, mu, nu = state
    count = count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * g * g, nu, grads)
    step_size = lr * jnp.sqrt(1 - b2**count) / (1 - b1**count)  # with Adam's bias corrections
    params = jax.tree.map(lambda p, m, n: p - step_size * m / (jnp.sqrt(n) + eps), params, mu, nu)
    return params, (count, mu, nu)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """A linear warm-up over 20 steps, then a cosine decay to a tenth of the peak at the last step."""
    warmup = min(1.0, step / 20)
    decay = 0.5 * (1 + np.cos(np.pi * min(step / steps, 1.0)))
    return float(peak * warmup * (0.1 + 0.9 * decay))


@functools.partial(jax.jit, static_argnames="cfg")
def train_step(params, opt_state, inputs, targets, lr, cfg: Config):
    """One step of Adam on a batch of inputs and targets (B, S); returns the new params, opt_state and the loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg)
    params, opt_state = adam_update(params, grads, opt_state, lr)
    return params, opt_state, loss


def make_mesh(seq_shards: int = 2) -> jax.sharding.Mesh:
    """A ("data", "seq") mesh of all devices: `seq_shards` along the sequence (1 where they do not divide the
    device count), the rest along the batch.

    Explicit axes (jax.make_mesh's default): every array's sharding is part of its type, known when tracing;
    there mlstm_chunkwise keeps each device's chunk states from the forward for the backward (with Auto axes it
    recomputes them in the backward)."""
    count = jax.device_count()
    seq_shards = seq_shards if count % seq_shards == 0 else 1
    return jax.make_mesh((count // seq_shards, seq_shards), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)


def train(
    cfg: Config,
    data: np.ndarray,
    mesh: jax.sharding.Mesh,
    *,
    steps: int = 300,
    batch: int = 16,
    seq_len: int = 64,
    lr: float = 4e-3,
    seed: int = 0,
    log_every: int = 25,
) -> tuple[dict, list[float]]:
    """Trains a model of `cfg` on random windows of `data` (token ids) over `mesh`, printing the loss every
    `log_every` steps; returns the trained parameters and every step's loss."""
    if batch % mesh.shape["data"] or seq_len % mesh.shape["seq"]:
        raise ValueError(f"batch {batch} and seq_len {seq_len} must divide evenly over the mesh {dict(mesh.shape)}")
    tokens = NamedSharding(mesh, P("data", "seq"))  # (B, S) blocks: batch over "data", sequence over "seq"
    replicated = NamedSharding(mesh, P())  # parameters and optimiser state: a whole copy on every device
    params = init_params(cfg, seed)
    zeros = jax.tree.map(np.zeros_like, params)
    params, opt_state = jax.device_put((params, (np.int32(0), zeros, zeros)), replicated)

    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        for step in range(1, steps + 1):
            inputs, targets = (jax.device_put(x, tokens) for x in random_windows(data, rng, batch, seq_len))
            lr_now = learning_rate(step, steps, lr)
            params, opt_state, loss = train_step(params, opt_state, inputs, targets, lr_now, cfg)
            losses.append(float(loss))
            if step % log_every == 0 or step in (1, steps):
                recent = losses[-log_every:]
                print(
                    f"step {step:4d}  loss {losses[-1]:.3f}  mean of the last {len(recent):2d}: {np.mean(recent):.3f}"
                    f"  ({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
    return params, losses


# ----------------------------------------------------------------------------------------------- generation


@functools.partial(jax.jit, static_argnames="cfg")
def prefill(params: dict, tokens, cfg: Config):
    """Runs the prompt tokens (B, S) at once; returns the logits after its last token (B, V) and every layer's
    cell states after it, [(c (B, NH, DH, DH), n (B, NH, DH), m (B, NH)), ...]."""
    x = embed(params, tokens)  # (B, S, D)
    states = []
    for block in params["blocks"]:
        q, k, v, i, f, z = cell_inputs(block, x, cfg.num_heads)
        h, state = pallas_mlstm.mlstm_chunkwise(
            q, k, v, i, f, chunk_size=cfg.chunk_size, backend=cfg.backend, return_last_states=True
        )
        states.append(state)
        x = cell_outputs(block, x, h, z)
    return logits_of(params, x)[:, -1], states


@functools.partial(jax.jit, static_argnames="cfg")
def decode_step(params: dict, token, states, cfg: Config):
    """One token per sequence (B,), after the tokens whose cell states are `states`: its next-token logits (B, V)
    and the states after it."""
    x = embed(params, token[:, None])  # (B, 1, D): a sequence of one token
    new_states = []
    for block, (c, n, m) in zip(params["blocks"], states):
        q, k, v, i, f, z = cell_inputs(block, x, cfg.num_heads)
        one = lambda y: y[:, :, 0]  # without the sequence axis: q, k, v (B, NH, DH), i, f (B, NH)
        h, state = pallas_mlstm.mlstm_recurrent_step(
            one(q), one(k), one(v), one(i), one(f), c, n, m, backend=cfg.backend
        )  # h (B, NH, DH)
        new_states.append(state)
        x = cell_outputs(block, x, h[:, :, None], z)
    return logits_of(params, x)[:, 0], new_states


def generate(params: dict, prompt, num_tokens: int, cfg: Config, *, temperature: float = 0.0, seed: int = 0):
    """Continues the prompt tokens (B, S) by num_tokens tokens: a prefill, then one recurrent step per token.

    temperature 0 takes the most likely token (greedy), else samples from softmax(logits / temperature).
    Returns the new tokens (B, num_tokens) and the logits each was chosen from (B, num_tokens, V)."""
    key = jax.random.key(seed)
    logits, states = prefill(params, prompt, cfg)
    tokens, all_logits = [], []
    for _ in range(num_tokens):
        if temperature > 0:
            key, sample_key = jax.random.split(key)
            token = jax.random.categorical(sample_key, logits / temperature)
        else:
            token = jnp.argmax(logits, axis=-1)
        tokens.append(token)
        all_logits.append(logits)
        logits, states = decode_step(params, token, states, cfg)
    return jnp.stack(tokens, axis=1), jnp.stack(all_logits, axis=1)


def on_one_device(params: dict) -> dict:
    """The parameters on the first device, for generation. (A SingleDeviceSharding rather than the device itself:
    jax.device_put(x, device) of an array on Explicit mesh axes keeps that mesh in its type, and jit then asks to
    run on the whole mesh.)"""
    return jax.device_put(params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters, the batches and the sampling")
    parser.add_argument(
        "--backend",
        default=None,
        choices=pallas_mlstm.BACKENDS,
        help="the cell's backend (default: triton on a GPU, else xla)",
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (the 'data' axis must divide it)")
    parser.add_argument("--seq_len", type=int, default=64, help="characters per sequence (the 'seq' axis divides it)")
    parser.add_argument("--seq_shards", type=int, default=2, help="devices along the sequence: the 'seq' mesh axis")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    parser.add_argument("--prompt", default="def ", help="the start of the generated text")
    parser.add_argument("--num_generate", type=int, default=200, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    text = load_corpus()
    vocab = Vocab.from_text(text)
    mesh = make_mesh(args.seq_shards)
    cfg = Config(vocab_size=vocab.size, backend=args.backend)
    print(
        f"{len(text):,} characters, vocabulary {vocab.size}; {jax.device_count()} {jax.default_backend()} devices, "
        f"mesh {dict(mesh.shape)}; backend {pallas_mlstm.get_backend(args.backend).name}",
        flush=True,
    )

    start = time.perf_counter()
    params, losses = train(
        cfg,
        vocab.encode(text),
        mesh,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
    )
    print(
        f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-10:]):.3f} (mean of the last {min(10, len(losses))})"
    )

    prompt = jnp.asarray(vocab.encode(args.prompt))[None]  # (1, S)
    start = time.perf_counter()
    new, _ = generate(
        on_one_device(params), prompt, args.num_generate, cfg, temperature=args.temperature, seed=args.seed
    )
    print(f"generated {args.num_generate} characters in {time.perf_counter() - start:.1f} s:")
    print("-" * 80 + "\n" + args.prompt + vocab.decode(new[0]) + "\n" + "-" * 80)


if __name__ == "__main__":
    main()
