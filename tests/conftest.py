"""Shared fixtures: tiny random LLaMA models built in the test, and the real assets the repository carries
in tests/fixtures (a trained TinyStories model and small texts; origins and licenses in its README)."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cmoe import Calibration, CarveOptions, Compute, MoEShape, run_carve

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINYSTORIES_MODEL = FIXTURES / "tinystories-656k"
TINYSTORIES_TRAIN = FIXTURES / "text" / "TinyStoriesV2-GPT4-train-first2MiB.txt"
TINYSTORIES_VALID = FIXTURES / "text" / "TinyStories-valid-excerpt.txt"
WIKI_VALID = FIXTURES / "text" / "wiki.valid-first-128KiB.tokens"


def tinystories_calibration_windows(calibration: Calibration) -> torch.Tensor:
    """The windows a carve of the TinyStories model reads for `calibration` (a local text)."""
    from cmoe.calibration import calibration_windows, load_text, tokenize_text
    from cmoe.io.loading import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(str(TINYSTORIES_MODEL)))
    tokens = tokenize_text(load_text(calibration.source, "train").text, tokenizer)
    return calibration_windows(tokens, calibration.nsamples, calibration.seqlen, calibration.seed)


def tiny_llama(seed: int = 0, intermediate_size: int = 48, layers: int = 2) -> LlamaForCausalLM:
    """A random fp32 LLaMA small enough to carve in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, whether one file or sharded."""
    from cmoe.io.shards import read_tensors

    return read_tensors(Path(directory))


def weight_bytes(directory: Path) -> bytes:
    """The bytes of a saved model's safetensors files and index, in name order (byte-identity checks)."""
    files = sorted(Path(directory).glob("*.safetensors")) + sorted(Path(directory).glob("*.index.json"))
    assert files, f"no weights in {directory}"
    return b"".join(path.name.encode() + path.read_bytes() for path in files)


def save_tiny_model(directory: Path, layers: int = 2) -> Path:
    """A saved tiny random LLaMA (untied head) with the real TinyStories tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINYSTORIES_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random LLaMA directory with the real TinyStories tokenizer, for end-to-end commands."""
    return save_tiny_model(tmp_path / "tiny-dense")


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread, and do not fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    """The first 150 KB of the TinyStories train slice: plenty of 64-token windows, quick to tokenise."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def carved_dir(tmp_path_factory, train_text) -> Path:
    out = tmp_path_factory.mktemp("carved") / "S1A1E4"
    torch.set_num_threads(1)
    run_carve(
        str(TINYSTORIES_MODEL),
        out,
        CarveOptions(MoEShape.parse("S1A1E4")),
        Calibration(str(train_text), nsamples=4, seqlen=128, seed=0),
        compute=Compute("cpu", "float32", 2),
    )
    return out
