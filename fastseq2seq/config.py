"""The training configuration: a YAML file of keys, each of which also works as a command-line flag with dashes.

`--batch-tokens 2048` overrides `batch_tokens: 2048` from the file, which overrides the default below.
"""
import argparse
import dataclasses
import difflib
import typing


class UsageError(Exception):
    """Bad input from the user (files, data, config, checkpoints): reported as one line, exit status 2."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training after last.pt was saved: reported as one line, exit status 130."""


@dataclasses.dataclass
class Config:
    # Data. A side is a plain or .gz text file (one sentence a line); or give a TSV (source<TAB>target) as
    # train_src / valid_src and leave the _tgt key empty.
    train_src: str = ""
    train_tgt: str = ""
    valid_src: str = ""
    valid_tgt: str = ""
    out: str = "runs/model"  # folder for checkpoints (last.pt, best.pt), log.csv and tensorboard/
    max_chars: int = 1000  # a longer line is an error, not silently dropped
    # Vocabulary: one sentencepiece model for both sides, stored inside every checkpoint.
    vocab: str = ""  # an existing sentencepiece .model file; empty: train one on the training data
    vocab_size: int = 8000  # an upper bound: a small corpus gets fewer pieces
    vocab_model_type: str = "unigram"  # unigram | bpe | char | word
    # Model (fastseq2seq.models.Seq2Seq).
    emb_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    attention: str = "bahdanau"  # bahdanau | luong-dot | luong-general
    input_feeding: bool = True
    dropout: float = 0.2
    tie_embeddings: bool = False
    # Optimization: AdamW, linear warm-up then inverse-square-root decay (independent of max_steps, so a run
    # can be resumed with a larger max_steps and follow the same schedule).
    batch_tokens: int = 4096  # padded source-or-target tokens per global batch (all ranks together)
    lr: float = 1e-3
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    max_steps: int = 100000
    max_epochs: int = 0  # 0: no limit
    max_minutes: float = 0.0  # wall-clock budget for this run; 0: no limit
    seed: int = 1
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core)
    bf16: bool = True  # bf16 autocast, on GPU only
    # Validation and early stopping.
    valid_every: int = 1000  # steps
    valid_beam: int = 1  # 1: greedy decoding
    metric: str = "bleu"  # bleu | chrf | loss | exact_match: decides best.pt and early stopping
    patience: int = 10  # validations without improvement before stopping; 0: never stop early
    stop_at_metric: typing.Optional[float] = None  # stop as soon as the metric reaches this value
    log_every: int = 100  # steps between CSV / TensorBoard training rows


METRICS = ("bleu", "chrf", "loss", "exact_match")
CHOICES = {"attention": ("bahdanau", "luong-dot", "luong-general"), "device": ("auto", "cpu", "cuda"),
           "metric": METRICS, "vocab_model_type": ("unigram", "bpe", "char", "word")}
FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def _parse_bool(text):
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(key, value):
    """value (from YAML or a flag) as the type of `key`, or UsageError."""
    kind = FIELDS[key].type
    optional = typing.get_origin(kind) is typing.Union
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if value is None or str(value).lower() in ("none", "null", ""):
            return None
    try:
        if kind is bool:
            converted = value if isinstance(value, bool) else _parse_bool(value)
        elif kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"expected text, got {value!r}")
            converted = str(value)
        elif kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        else:
            converted = kind(value)
    except (TypeError, ValueError) as error:
        raise UsageError(f"config key {key}: {error}") from None
    if key in CHOICES and converted not in CHOICES[key]:
        raise UsageError(f"config key {key}: {converted!r} is not one of {', '.join(CHOICES[key])}")
    return converted


def _unknown_key(key, where):
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"{where}: unknown config key {key!r}{hint}")


def load_yaml(path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise UsageError(f"config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config {path}: expected key: value lines, got a {type(values).__name__}")
    for key in values:
        if key not in FIELDS:
            raise _unknown_key(str(key), f"config {path}")
    return values


def make_config(file_values=None, overrides=None) -> Config:
    """Defaults, then the YAML file's values, then overrides (flag values, already by key)."""
    values = {}
    for source in (file_values or {}), (overrides or {}):
        for key, value in source.items():
            if key not in FIELDS:
                raise _unknown_key(key, "config")
            values[key] = _convert(key, value)
    return Config(**values)


def add_config_flags(parser: argparse.ArgumentParser):
    """One flag per config key (--train-src for train_src); unset flags stay None so the file's value wins."""
    group = parser.add_argument_group("config keys (override the --config file)")
    for key in FIELDS:
        group.add_argument("--" + key.replace("_", "-"), dest=key, default=None, metavar="VALUE")


def config_from_args(args) -> Config:
    file_values = load_yaml(args.config) if args.config else {}
    overrides = {key: getattr(args, key) for key in FIELDS if getattr(args, key) is not None}
    return make_config(file_values, overrides)
