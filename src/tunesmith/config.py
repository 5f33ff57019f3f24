"""One typed config schema (pydantic), YAML loading, `key.sub=value` overrides and the built-in configs."""

from __future__ import annotations

import difflib
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelCfg(_Strict):
    name: str = Field(description="registry name, local HF folder, hub id or .gguf file")
    trust_remote_code: bool = False
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn_implementation: str | None = None


class LoraCfg(_Strict):
    r: int = Field(64, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", min_length=1)


class PersonaCfg(_Strict):
    name: str
    author: str
    langs: list[Literal["zh", "en"]] = ["zh", "en"]
    n: int = Field(1000, ge=1)
    system: str | None = None
    system_ratio: float = Field(0.15, ge=0.0, le=1.0)  # without `system`: the share with a generic system prompt
    seed: int = 0


class DataFileCfg(_Strict):
    path: str
    format: Literal["auto", "openai", "alpaca", "sharegpt"] = "auto"
    fields: dict[str, str] = {}
    repeat: int = Field(1, ge=1)


class RegularizeCfg(_Strict):
    """Self-distillation: general prompts answered by the base model before training, mixed in."""

    ratio: float = Field(0.0, ge=0.0)
    max_new_tokens: int = Field(128, ge=1)
    # train those answers towards the base model's whole next-token distribution (forward KL, the base being the
    # model with its LoRA adapter switched off) instead of by cross-entropy on the one sampled answer;
    # auto: on for lora / qlora, off for a full fine-tune (which has no adapter to switch off)
    kl: bool | Literal["auto"] = "auto"

    @field_validator("kl", mode="before")
    @classmethod
    def _kl_value(cls, v):
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("must be true, false or auto")


class DataCfg(_Strict):
    persona: PersonaCfg | None = None
    files: list[DataFileCfg] = []
    regularize: RegularizeCfg = RegularizeCfg()
    max_length: int = Field(2048, ge=16)
    pack: bool = True
    truncation: Literal["truncate", "drop"] = "truncate"

    @model_validator(mode="after")
    def _some_data(self) -> "DataCfg":
        if self.persona is None and not self.files:
            raise ValueError("give data.persona (generated identity data) or data.files (your datasets), or both")
        return self


class TrainCfg(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = None  # None (or 0, or -1 as in transformers): as many steps as `epochs` take
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(16, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    grad_checkpointing: bool = True
    # fast paths (fused linear+CE, one-function LoRA layers, compiled RMSNorm/SwiGLU/RoPE on CUDA); off = reference path
    kernels: Literal["auto", "on", "off"] = "auto"
    # keep checkpointed layer inputs in pinned host memory ('auto': on for one CUDA device)
    offload_activations: Literal["auto"] | bool = "auto"
    # LoRA/QLoRA: the frozen input embedding and output head live in pinned host memory, the head on the GPU only
    # for the loss ('auto': on where activations are offloaded on CUDA and the fused loss runs, for an untied head;
    # true: also tied ones, and on the CPU, where it saves nothing)
    offload_embeddings: Literal["auto"] | bool = "auto"
    # each decoder layer's body compiled by torch.compile, one graph for all layers ('auto': on where activations
    # are offloaded, i.e. CUDA with checkpointing and no FSDP — one GPU or each data-parallel rank; needs Triton;
    # falls back to eager if compiling fails)
    compile: Literal["auto"] | bool = "auto"
    # several processes: shard the frozen base with FSDP2 too (true) or keep it whole on every rank and train data
    # parallel (false; 'auto': LoRA when the base fits, QLoRA always — its NF4 weights are never sharded)
    shard_frozen: Literal["auto"] | bool = "auto"
    seed: int = 42
    save_steps: int = Field(500, ge=0)  # 0: only the final save
    save_total_limit: int = Field(2, ge=1)
    sample_steps: int = Field(300, ge=0)  # 0: samples only before and after training
    evaluation_inputs: list[str] = []
    system: str | None = None
    max_new_tokens: int = Field(64, ge=1)
    device: str = "auto"

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v):
        if v is not None and v < 0 and v != -1:
            raise ValueError("must be a number of optimizer steps (>= 1), or null / -1 to train for train.epochs")
        return None if v is not None and v <= 0 else v

    @field_validator("kernels", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):  # YAML reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalCfg(_Strict):
    """`tunesmith run`: persona evaluation (identity / leakage / retention) before and after training."""

    enabled: bool = True
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1)  # prompts per pool and language (None: all)


class Config(_Strict):
    model: ModelCfg
    method: Literal["full", "lora", "qlora"] = "qlora"
    lora: LoraCfg = LoraCfg()
    data: DataCfg
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    work_dir: str = "work_dirs/run"

    def use_kl(self) -> bool:
        """Whether self-distillation samples are trained by KL to the base model (`data.regularize.kl`)."""
        kl = self.data.regularize.kl
        return self.method != "full" if kl == "auto" else kl

    @model_validator(mode="after")
    def _kl_needs_adapter(self) -> "Config":
        if self.data.regularize.kl is True and self.method == "full":
            raise ValueError("data.regularize.kl needs the base model beside the trained one: use method lora or "
                             "qlora, or set data.regularize.kl=false for a full fine-tune")
        return self


# ----------------------------------------------------------------------------- errors


def _fields_at(loc: tuple) -> list[str]:
    """Valid key names of the schema object that holds location `loc` (without its last part)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    model = cc
                    break
            else:
                continue
            break
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _explain(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    lines = [f"{source}: invalid config"]
    set_by = {o.split("=", 1)[0].strip(): o for o in overrides if "=" in o}
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        line_no = len(lines)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" — did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"  unknown key '{key}'{hint} (valid here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"  missing key '{key}'")
        else:
            where = f"'{key}'" if key else "config"
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"  # a whole section is no help to print
            lines.append(f"  {where}: {e['msg']}{got}")
        given = [o for k, o in set_by.items() if key == k or key.startswith(k + ".")]
        if given and len(lines) > line_no:  # the value came from the command line, not from the file
            lines[-1] += f" [from the command line: {given[-1]}]"
    return "\n".join(lines)


# ----------------------------------------------------------------------------- load / override


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def load_config(path_or_name: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a file path or a built-in config name), apply overrides and validate."""
    path = resolve_config_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values")
    apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        builtin = builtin_configs().get(path.stem) == path
        source = f"built-in config '{path.stem}'" if builtin else str(path)
        raise UserError(_explain(e, source, overrides or [])) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- built-in configs


def builtin_configs() -> dict[str, Path]:
    root = resources.files("tunesmith") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    builtins = builtin_configs()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if name in builtins and not p.exists():
        return builtins[name]
    near = difflib.get_close_matches(name, list(builtins), n=1, cutoff=0.4)
    hint = f" Did you mean the built-in '{near[0]}'?" if near else " See `tunesmith list-cfg`."
    raise UserError(f"config '{path_or_name}' is neither a file nor a built-in config.{hint}")


def list_configs(pattern: str | None = None) -> list[str]:
    names = sorted(builtin_configs())
    if pattern:
        names = [n for n in names if pattern.lower() in n.lower()]
    return names


def copy_config(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy a built-in config to DEST: a folder (as NAME_copy.yaml inside it) or a .yaml/.yml file path. An existing
    file is kept (it may hold the user's edits) unless `force`."""
    builtins = builtin_configs()
    if name not in builtins:
        near = difflib.get_close_matches(name, list(builtins), n=1, cutoff=0.4)
        hint = f" Did you mean '{near[0]}'?" if near else " See `tunesmith list-cfg`."
        raise UserError(f"no built-in config named '{name}'.{hint}")
    dest = Path(dest)
    out = dest if dest.suffix.lower() in (".yaml", ".yml") and not dest.is_dir() else dest / f"{name}_copy.yaml"
    if out.exists() and not force:
        raise UserError(f"{out} already exists (your edits may be in it): give another destination, or --force to "
                        f"overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(builtins[name], out)
    return out
