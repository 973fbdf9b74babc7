"""The "Examples" of the guide "Quantizing model code you did not write"
(docs/model_code.md; the README's section before the docs site), run verbatim, with
checks after them on the names they leave behind.  tests/test_docs_guides.py leaves
this page to this test."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "model_code.md"
SECTION = "## Examples"


def snippets() -> list[str]:
    text = GUIDE.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_its_two_snippets():
    assert len(snippets()) == 2


@pytest.mark.slow
def test_linen_snippet_gpt2_gemma_and_a_scanned_stack(capsys):
    pytest.importorskip("transformers")
    namespace: dict = {}
    exec(compile(snippets()[0], "docs/model_code.md", "exec"), namespace)
    printed = capsys.readouterr().out
    # GPT-2: 4 weights a layer, 2 layers, wte looked up and tied as the head, wpe looked up
    assert re.search(r"-> 11 op\(s\): transformer/wte/embedding", printed), printed
    # the last loop turn served the scanned stack from codes
    served = namespace["served"]
    stats = namespace["upd"]["quant_stats"]
    leaves = [np.shape(x) for x in __import__("jax").tree_util.tree_leaves(stats)]
    assert leaves and all(s[:1] == (4,) for s in leaves)  # one range per scanned layer
    assert namespace["logits"].shape == (2, 16, 64)
    assert served["params"]


def test_nnx_equinox_and_function_snippet(tmp_path, monkeypatch):
    pytest.importorskip("equinox")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippets()[1], "docs/model_code.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 10)
    assert (tmp_path / "mlp.msgpack").stat().st_size < 64 * 128 + 128 * 10  # 4-bit codes
    # the Equinox model served from codes computes the fake-quantized evaluation
    import equinox as eqx

    ref, _ = eqx.nn.inference_mode(namespace["qmodel"])(namespace["x"],
                                                         state=namespace["state"])
    np.testing.assert_allclose(np.asarray(namespace["y"]), np.asarray(ref), rtol=1e-5,
                               atol=1e-5)
    float_y = namespace["model"](namespace["x"][0])  # int4 weights move the output
    assert not np.allclose(np.asarray(ref[0]), np.asarray(float_y), rtol=1e-4, atol=1e-4)
    assert jnp.isfinite(namespace["y"]).all()


README = GUIDE.parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_section_runs(capsys):
    """The README's short "Quantizing model code you did not write" section, verbatim:
    GPT-2's transposed kernels and tied head found, served; a plain function's
    weight stored (out, in) quantized per output channel."""
    pytest.importorskip("transformers")
    text = README.read_text()
    start = text.index("## Quantizing model code you did not write")
    (code,) = re.findall(r"```python\n(.*?)```", text[start:text.index("\n## ", start + 3)],
                         flags=re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert re.search(r"-> 11 op\(s\): transformer/wte/embedding", capsys.readouterr().out)
    served = namespace["served"]["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]
    import pychop_jax as pj

    assert isinstance(served["kernel"], pj.QuantizedArray) and served["kernel"].packed
    qmlp, v = namespace["qmlp"], namespace["v"]
    report = qmlp.report(v, jnp.ones((4, 64)))
    assert report.weights()["w2"].contracted == (1,)
    assert report.weights()["w2"].weight_spec.axis == 0
