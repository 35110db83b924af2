"""examples/train_lm.py: its command line runs, the loss falls, and decoding equals a full forward pass.

The example runs in a subprocess of its own: it must set XLA_FLAGS (4 CPU devices) before JAX starts, and this
process has started JAX already. One subprocess does it all, so that the train step compiles once: the command
line (`main`, a few steps) first, then `train` for STEPS with the same settings (its compiled step is reused), then
greedy generation (prefill + recurrent steps) against a forward pass over the prompt and the generated tokens.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40
CLI_STEPS = 2  # the command line runs, logs and generates; the loss falls over STEPS

SCRIPT = textwrap.dedent(
    f"""
    import json, sys
    sys.path.insert(0, "examples")
    import train_lm as lm  # sets XLA_FLAGS for 4 CPU devices, then imports jax

    import jax, jax.numpy as jnp, numpy as np

    lm.main(["--steps", "{CLI_STEPS}", "--num_generate", "8", "--temperature", "0"])

    text = lm.load_corpus()
    vocab = lm.Vocab.from_text(text)
    mesh = lm.make_mesh()
    cfg = lm.Config(vocab_size=vocab.size)  # main's defaults
    params, losses = lm.train(cfg, vocab.encode(text), mesh, steps={STEPS}, log_every=1000)

    params = lm.on_one_device(params)
    prompt = jnp.asarray(vocab.encode("def "))[None]  # (1, P)
    new, step_logits = lm.generate(params, prompt, 24, cfg)  # greedy: (1, N), (1, N, V)
    tokens = jnp.concatenate([prompt, new], axis=1)  # (1, P + N)
    # logits[:, t] predicts token t + 1: the last N - 1 generated tokens and the one after them
    full_logits = jax.jit(lm.forward, static_argnames="cfg")(params, tokens, cfg)[:, prompt.shape[1] - 1 : -1]
    print(json.dumps({{
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "losses": losses,
        "generated": np.asarray(new).tolist(),
        "step_logits": np.asarray(step_logits).tolist(),
        "full_logits": np.asarray(full_logits).tolist(),
    }}))
    """
)


@pytest.fixture(scope="module")
def run():
    """Runs SCRIPT; returns its stdout lines before the result, and the result (its last line, JSON)."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    # XLA's default optimisation level (the tests' conftest sets 0): the train step runs ~2x faster, for a few
    # seconds more of compilation
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "").strip()
    env["JAX_PLATFORMS"] = "cpu"  # the example's 4 CPU devices, on a GPU machine too
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    lines = done.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_command_line_trains_and_generates(run):
    output, result = run
    assert result["devices"] == 4 and result["mesh"] == {"data": 2, "seq": 2}
    assert any(line.startswith(f"trained {CLI_STEPS} steps") for line in output), output
    assert any(line.startswith("generated 8 characters") for line in output), output
    assert sum(line.startswith("step ") for line in output) >= 2, output  # progress lines


def test_loss_falls(run):
    losses = np.array(run[1]["losses"])
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    # From ~log(V) = 4.6 nats (a uniform guess) at the start to well below 3.5 after 40 steps.
    assert losses[0] > 4.0, losses
    assert losses[-5:].mean() < losses[0] - 1.0, losses


def test_decoding_equals_full_forward(run):
    """Greedy generation by prefill + mlstm_recurrent_step gives the argmax tokens of one chunkwise forward pass over
    the prompt and the generated text, from the same logits (to float32 rounding)."""
    result = run[1]
    generated = np.array(result["generated"])  # (1, N)
    step_logits, full_logits = np.array(result["step_logits"]), np.array(result["full_logits"])  # (1, N, V)
    assert step_logits.shape == full_logits.shape == (1, generated.shape[1], step_logits.shape[2])
    np.testing.assert_array_equal(generated, full_logits.argmax(-1))
    np.testing.assert_allclose(step_logits, full_logits, rtol=0, atol=1e-4)
