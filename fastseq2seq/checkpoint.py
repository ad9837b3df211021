"""Checkpoints: one torch.save'd dict of tensors and plain values (loadable with weights_only=True), written
atomically so that a crash or a full disk never leaves a half-written file where a good one was."""
import os
import tempfile

import torch

from fastseq2seq.config import UsageError
from fastseq2seq.data import Vocabulary

FORMAT = "fastseq2seq-checkpoint-1"
REQUIRED = ("format", "model_config", "model", "vocab")


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path) -> dict:
    """The checkpoint's dict; any unreadable, truncated or foreign file is a UsageError naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports truncation and corruption with many exception types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED):
        raise UsageError(f"checkpoint {path} is not a fastseq2seq checkpoint")
    return state


def model_and_vocab(state, path):
    """(Seq2Seq with the checkpoint's weights, its Vocabulary); a vocabulary that does not fit the model is an error."""
    from fastseq2seq.models import Seq2Seq

    try:
        vocab = Vocabulary(state["vocab"])
    except UsageError as error:
        raise UsageError(f"checkpoint {path}: {error}") from None
    config = state["model_config"]
    sizes = (config.get("src_vocab_size"), config.get("tgt_vocab_size"))
    if sizes != (len(vocab), len(vocab)):
        raise UsageError(f"checkpoint {path}: its model was built for vocabularies of {sizes[0]}/{sizes[1]} pieces, "
                         f"its sentencepiece vocabulary has {len(vocab)}: a checkpoint from another vocabulary")
    model = Seq2Seq.from_config(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UsageError(f"checkpoint {path}: weights do not fit its model config "
                         f"({str(error).strip().splitlines()[0]})") from None
    return model, vocab
