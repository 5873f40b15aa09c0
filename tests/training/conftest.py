import json

import pytest

from tests.tiny_models import LEE_DIR, tiny_model_dir

LEE_BACKGROUND = LEE_DIR / "lee_background.cor"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64) with a tokenizer trained on the Lee corpus."""
    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def lee_texts():
    return [line.strip() for line in LEE_BACKGROUND.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory, lee_texts):
    """Supervised rows from Lee documents: first sentence -> rest of the document, another document's
    rest as the hard negative; every other row has an instruction."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for i, text in enumerate(lee_texts[:64]):
        head, _, rest = text.partition(". ")
        other = lee_texts[(i + 7) % 64].partition(". ")[2]
        row = {"query": head, "positive": rest, "negatives": [other, lee_texts[i + 100]]}
        if i % 2:
            row["instruction"] = "Given a news headline sentence, retrieve the article: "
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path
