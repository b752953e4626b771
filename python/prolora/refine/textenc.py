"""Text encoders for `--refine`'s conditioning, found where users keep them and built lazily.

Where an encoder comes from (`find`):

- a diffusers pipeline folder: the family's encoder folders (`text_encoder/`, ...) and, when
  present, their tokenizer folders;
- a single-file checkpoint that embeds its encoders (SD1.x `cond_stage_model.*`, SDXL / SSD-1B
  `conditioner.embedders.*`, ComfyUI all-in-one `text_encoders.*`): the very tensors prolora reads
  as LoRA targets, located through the model's own weight references (checkpoints/encoders.py);
- `--text-encoder FILE` (repeatable): a separate CLIP-L, CLIP-G / OpenCLIP or T5 encoder file in
  transformers names (HF `model.safetensors`, ComfyUI `clip_l` / `clip_g` / `t5xxl_*`, also with a
  prefix) or OpenCLIP names; float8 files (`t5xxl_fp8_e4m3fn`, scaled or not) are upcast. GGUF
  encoders are not read (prolora reads no GGUF file).

`build` makes transformers' CLIPTextModel / CLIPTextModelWithProjection / T5EncoderModel from a
config read off the shapes (what no shape tells, a CLIP's head count, follows the published
encoders: 64-wide heads at widths 768 / 1024 / 1280; narrower ones are the project's shrunken
synthetic encoders, 32-wide heads), on the meta device then filled from the file, one encoder at
a time and only when prompts are encoded, after its size is checked against the memory budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..checkpoints.encoders import canonical_clip_name, openclip_to_transformers
from ..errors import InputFileError, ModelError, OptionError
from ..safetensors_io import Header, SafetensorsFile, read_header

# each storage's layer keys: (kind, regex whose match start is where the encoder's prefix ends)
_ANCHORS = (("t5", re.compile(r"(?:encoder\.)?block\.\d+\.layer\.\d+\.(?:SelfAttention|DenseReluDense)\.")),
            ("openclip", re.compile(r"transformer\.resblocks\.\d+\.(?:attn|mlp|ln_)")),
            ("clip", re.compile(r"(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn|mlp|layer_norm)")))
_LABELS = {("clip", 768): "CLIP-L", ("clip", 1280): "CLIP-G", ("clip", 1024): "OpenCLIP-H",
           ("openclip", 1280): "OpenCLIP-G", ("openclip", 1024): "OpenCLIP-H"}


@dataclass
class Encoder:
    """One text encoder: what it is, where it lives, and its shapes."""

    kind: str  # clip (transformers names) | openclip (OpenCLIP names) | t5
    where: str  # for the report: "embedded in FILE (PREFIX)", "FOLDER/text_encoder", "--text-encoder FILE"
    role: str = ""  # the family's role: clip | clip2 | t5
    path: Path | None = None  # the file holding its tensors (None: a pipeline component folder)
    prefix: str = ""
    folder: Path | None = None  # a pipeline's encoder folder (transformers from_pretrained)
    tokenizer_dir: Path | None = None  # its tokenizer folder, when the pipeline ships one
    facts: dict = field(default_factory=dict)  # hidden, layers, vocab, positions, projection, ...
    component: str = ""  # the model's component it is (text_encoder, ...), where the model holds it
    drop_last: bool = False  # build one layer fewer (SD2's "penultimate" OpenCLIP-H in LDM files)
    source: object | None = None  # the model whose file holds it (its open file handle is reused)

    @property
    def family(self) -> str:
        return "t5" if self.kind == "t5" else "clip"

    @property
    def label(self) -> str:
        h = self.facts.get("hidden")
        if self.kind == "t5":
            return f"T5 encoder ({self.facts.get('layers')} blocks, {h} wide)" if h != 4096 else "T5-XXL"
        name = "OpenCLIP" if self.kind == "openclip" else "CLIP"
        return _LABELS.get((self.kind, h)) or f"{name} text encoder ({h} wide, {self.facts.get('layers')} layers)"

    def describe(self) -> str:
        return f"{self.label} ({self.where})"

    def nbytes(self, itemsize: int = 4) -> int:
        return int(self.facts.get("params", 0)) * itemsize


# ------------------------------------------------------------------------------ finding them


def _storage(keys) -> tuple[str, str] | None:
    """(kind, prefix) of the first encoder layer key among `keys` (a vision tower's aside)."""
    for kind, rx in _ANCHORS:
        for k in keys:
            m = rx.search(k)
            if m and not k.startswith("visual."):
                return kind, k[:m.start()]
    return None


def _facts(kind: str, prefix: str, tensors: dict) -> dict:
    """Shapes of an encoder stored under `prefix` (tensors: key -> info with .shape)."""
    shape = lambda k: tuple(tensors[prefix + k].shape) if prefix + k in tensors else None  # noqa: E731
    keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]
    params = sum(int(torch.Size(tensors[prefix + k].shape).numel()) for k in keys)
    if kind == "t5":
        enc = "encoder." if shape("encoder.block.0.layer.0.SelfAttention.q.weight") else ""
        q = shape(enc + "block.0.layer.0.SelfAttention.q.weight")
        bias = shape(enc + "block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        emb = shape("shared.weight") or shape(enc + "embed_tokens.weight")
        gated = shape(enc + "block.0.layer.1.DenseReluDense.wi_0.weight")
        ff = gated or shape(enc + "block.0.layer.1.DenseReluDense.wi.weight")
        if not (q and bias and emb and ff):
            return {}
        layers = len({k.split(".")[1 + bool(enc)] for k in keys if k.startswith(enc + "block.")})
        return dict(hidden=q[1], inner=q[0], heads=bias[1], buckets=bias[0], vocab=emb[0], ff=ff[0],
                    gated=gated is not None, layers=layers, params=params, enc=enc)
    if kind == "openclip":
        emb, pos, fc = shape("token_embedding.weight"), shape("positional_embedding"), \
            shape("transformer.resblocks.0.mlp.c_fc.weight")
        proj = shape("text_projection")
        layers = len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")})
        proj_w = proj[1] if proj else None
    else:
        tm = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
        emb, pos = shape(tm + "embeddings.token_embedding.weight"), shape(tm + "embeddings.position_embedding.weight")
        fc = shape(tm + "encoder.layers.0.mlp.fc1.weight")
        proj = shape("text_projection.weight")
        layers = len({k.split(".")[2 + bool(tm)] for k in keys if k.startswith(tm + "encoder.layers.")})
        proj_w = proj[0] if proj else None
    if not (emb and pos and fc):
        return {}
    return dict(hidden=emb[1], vocab=emb[0], positions=pos[0], ff=fc[0], layers=layers, projection=proj_w,
                params=params)


def embedded(base: BaseModel, components: list[str]) -> list[Encoder]:
    """The encoders a single file embeds, in `components` order (those it holds)."""
    out = []
    for comp in components:
        ref = next((r for m, r in base.weights.items() if m.startswith(comp + ".")), None)
        if ref is None:
            continue
        header = base.headers.get(ref.file)
        found = _storage([ref.key]) if header is not None else None
        if found is None:
            continue
        kind, prefix = found
        facts = _facts(kind, prefix, header.tensors)
        if facts:
            name = Path(ref.file).name
            out.append(Encoder(kind, f"{comp} embedded in {name}, keys {prefix}*", path=Path(ref.file), prefix=prefix,
                               facts=facts, component=comp, source=base))
    return out


def from_folder(root: Path, parts: list[tuple[str, str, str]]) -> list[Encoder] | None:
    """A pipeline folder's encoders [(role, encoder folder, tokenizer folder)]; None when one is missing."""
    import json

    out = []
    for role, enc, tok in parts:
        folder = root / enc
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        kind = "t5" if "t5" in str(cfg.get("model_type", "")).lower() else "clip"
        facts = dict(hidden=cfg.get("d_model") or cfg.get("hidden_size"), vocab=cfg.get("vocab_size"),
                     layers=cfg.get("num_layers") or cfg.get("num_hidden_layers"),
                     positions=cfg.get("max_position_embeddings"), config=cfg)
        tokdir = root / tok
        out.append(Encoder(kind, f"{root.name}/{enc}", role=role, folder=folder, component=enc,
                           tokenizer_dir=tokdir if tokdir.is_dir() else None, facts=facts))
    return out


def from_file(path: str | Path) -> Encoder:
    """A `--text-encoder FILE`: which encoder it is, from its keys and shapes."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"--text-encoder {p}: no such file")
    if p.suffix.lower() == ".gguf":
        raise InputFileError(f"--text-encoder {p}: GGUF encoders are not read; give the .safetensors file")
    header = read_header(p)
    found = _storage(header.tensors)
    facts = _facts(*found, header.tensors) if found else {}
    if not facts:
        raise InputFileError(f"--text-encoder {p}: not a CLIP, OpenCLIP or T5 text encoder (no "
                             "'encoder.layers.0.self_attn.q_proj', 'transformer.resblocks.0.attn' or "
                             "'encoder.block.0.layer.0.SelfAttention.q' weights)")
    return Encoder(found[0], f"--text-encoder {p}", path=p, prefix=found[1], facts=facts)


def assign_roles(encoders: list[Encoder]) -> list[Encoder]:
    """Roles of encoders given as files: T5 `t5`, the CLIPs `clip` then `clip2` by width (CLIP-L
    before CLIP-G), the family's `take` deciding what each gives."""
    clips = sorted((e for e in encoders if e.family == "clip"), key=lambda e: e.facts.get("hidden") or 0)
    if len(clips) > 2 or sum(e.kind == "t5" for e in encoders) > 1:
        raise OptionError("--text-encoder: at most two CLIP encoders and one T5 (" +
                          ", ".join(e.describe() for e in encoders) + ")")
    for e, role in zip(clips, ("clip", "clip2")):
        e.role = role
    for e in encoders:
        if e.kind == "t5":
            e.role = "t5"
    return clips + [e for e in encoders if e.kind == "t5"]


# ------------------------------------------------------------------------------ building them


def _clip_heads(hidden: int) -> int:
    """64-wide heads at the published widths (CLIP-L 768, OpenCLIP-H 1024, -G 1280), else the
    shrunken synthetic encoders' 32-wide heads."""
    return hidden // 64 if hidden in (768, 1024, 1280) else max(1, hidden // 32)


def _clip_act(enc: Encoder) -> str:
    h = enc.facts["hidden"]
    if enc.kind == "openclip" or h in (1024, 1280):
        return "gelu"
    return "quick_gelu" if h == 768 or not enc.facts.get("projection") else "gelu"


def _tensor(f, key: str, scales: dict) -> torch.Tensor:
    t = f.get(key)
    if t.dtype.itemsize == 1 and t.is_floating_point():  # float8 storage, scaled where the file says
        t = t.to(torch.float32)
        s = scales.get(key[: -len("weight")] + "scale_weight")
        if s is not None:
            t = t * f.get(s).to(torch.float32)
    return t


def _state(enc: Encoder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{transformers name: tensor} of a file-held encoder, as `dtype`."""
    f = enc.source._file(enc.path) if enc.source is not None else SafetensorsFile(enc.path)
    header: Header = enc.source.headers[enc.path] if enc.source is not None else f.header
    keys = [k for k in header.tensors if k.startswith(enc.prefix)]
    scales = {k: k for k in keys if k.endswith(".scale_weight")}
    state: dict[str, torch.Tensor] = {}
    for key in keys:
        rest = key[len(enc.prefix):]
        if rest.endswith((".scale_weight", ".scale_input")) or rest in ("scaled_fp8", "logit_scale"):
            continue
        if enc.kind == "openclip":
            pieces = openclip_to_transformers(rest)
            if not pieces:
                continue
            t = _tensor(f, key, scales)
            for p in pieces:
                v = t.chunk(3)[p.part] if p.part is not None else t
                state[p.name] = (v.t() if p.transposed else v).to(dtype).contiguous()
        elif enc.kind == "clip":
            if rest.endswith("position_ids"):
                continue
            state[canonical_clip_name(rest)] = _tensor(f, key, scales).to(dtype)
        else:
            name = rest if rest.startswith(("encoder.", "shared.")) else "encoder." + rest
            state[name] = _tensor(f, key, scales).to(dtype)
    if enc.kind == "t5":
        emb = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = emb
    if enc.source is None:
        f.close()
    return state


def _config(enc: Encoder):
    fx = enc.facts
    if enc.kind == "t5":
        from transformers import T5Config

        return T5Config(vocab_size=fx["vocab"], d_model=fx["hidden"], d_kv=fx["inner"] // fx["heads"], d_ff=fx["ff"],
                        num_layers=fx["layers"], num_heads=fx["heads"], relative_attention_num_buckets=fx["buckets"],
                        feed_forward_proj="gated-gelu" if fx["gated"] else "relu", is_encoder_decoder=False,
                        use_cache=False, pad_token_id=0, eos_token_id=1)
    from transformers import CLIPTextConfig

    vocab = fx["vocab"]
    return CLIPTextConfig(vocab_size=vocab, hidden_size=fx["hidden"], intermediate_size=fx["ff"],
                          num_hidden_layers=fx["layers"] - enc.drop_last, num_attention_heads=_clip_heads(fx["hidden"]),
                          max_position_embeddings=fx["positions"], hidden_act=_clip_act(enc), layer_norm_eps=1e-5,
                          projection_dim=fx.get("projection") or fx["hidden"], bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def build(enc: Encoder, device: str, budget: int | None) -> torch.nn.Module:
    """The encoder as a transformers model in eval mode on `device` (float32 on the CPU, bfloat16
    when float32 would exceed `budget`; the stored half precision on a GPU)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    cls = T5EncoderModel if enc.kind == "t5" else (
        CLIPTextModelWithProjection if enc.role == "clip2" else CLIPTextModel)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if budget is not None and enc.nbytes(4 if dtype == torch.float32 else 2) > budget:
        dtype = torch.bfloat16
        if enc.nbytes(2) > budget:
            raise OptionError(f"{enc.describe()}: {enc.nbytes(2) / 2**30:.2f} GiB in bfloat16 to encode the prompts, "
                              f"more than the {budget / 2**30:.2f} GiB memory budget; raise --max-memory or give "
                              "--refine-cond random --refine-tokens N")
    if enc.folder is not None:
        model = cls.from_pretrained(enc.folder, local_files_only=True, torch_dtype=dtype)
        vocab = getattr(model.config, "vocab_size", 0)
        if enc.kind != "t5" and not 0 <= (model.config.eos_token_id or -1) < vocab:
            for mod in model.modules():  # an end token outside the vocabulary (a shrunken synthetic
                if hasattr(mod, "eos_token_id"):  # encoder): pool at the last id, as for single files
                    mod.eos_token_id = vocab - 1
        return model.to(device).eval()
    state = _state(enc, dtype)
    with torch.device("meta"):
        model = cls(_config(enc))
    own = model.state_dict()
    if enc.kind != "t5":  # transformers 5's CLIPTextModel names its parameters without `text_model.`
        names = {canonical_clip_name(k): k for k in own}
        state = {names[k]: v for k, v in state.items() if k in names}
    state = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ModelError(f"{enc.describe()}: no tensor for '{missing[0]}' ({len(missing)} missing)")
    bad = next((k for k in own if tuple(own[k].shape) != tuple(state[k].shape)), None)
    if bad:
        raise ModelError(f"{enc.describe()}: '{bad}' has shape {tuple(state[bad].shape)}, expected {tuple(own[bad].shape)}")
    model.load_state_dict(state, assign=True, strict=False)
    for mod in model.modules():  # non-persistent buffers stay on the meta device: make them
        ids = getattr(mod, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            mod.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(1, -1), persistent=False)
    if enc.kind == "t5":
        model.encoder.embed_tokens = model.shared
    return model.to(device).eval()


__all__ = ["Encoder", "assign_roles", "build", "embedded", "from_file", "from_folder"]
