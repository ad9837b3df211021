"""Corpora (plain, .gz or TSV, validated), the sentencepiece vocabulary, and length-bucketed token-count batches."""
import gzip
import io
import os
from dataclasses import dataclass

import torch

from fastseq2seq.config import UsageError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # the ids Seq2Seq expects by default


def _open_binary(path):
    """A binary file object; gzip when the file starts with gzip's magic bytes, whatever its name."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    f = open(path, "rb")
    if f.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)
    return f


def decode_line(raw: bytes, where) -> str:
    """One line of input without its line ending; invalid UTF-8 is an error naming `where`."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise UsageError(f"{where}: invalid UTF-8 at byte {error.start}") from None


def check_line(line: str, where, max_chars: int):
    if not line.strip():
        raise UsageError(f"{where}: empty line")
    if len(line) > max_chars:
        raise UsageError(f"{where}: line of {len(line)} characters is longer than max_chars={max_chars}")


def read_lines(path, max_chars: int) -> list:
    """Every line of a plain or gzipped UTF-8 text file; empty or over-long lines are errors."""
    lines = []
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                line = decode_line(raw, f"{path} line {number}")
                check_line(line, f"{path} line {number}", max_chars)
                lines.append(line)
    except (EOFError, OSError) as error:  # a truncated or corrupt .gz, an unreadable file
        raise UsageError(f"{path}: unreadable ({error})") from None
    if not lines:
        raise UsageError(f"{path}: no lines")
    return lines


def read_parallel(src_path, tgt_path, max_chars: int):
    """(sources, targets) from two aligned files, or from one TSV (source<TAB>target) when tgt_path is empty."""
    if not src_path:
        raise UsageError("no source file given")
    if not tgt_path:
        pairs = []
        for number, line in enumerate(read_lines(src_path, 2 * max_chars + 1), 1):
            fields = line.split("\t")
            where = f"{src_path} line {number}"
            if len(fields) != 2:
                raise UsageError(f"{where}: expected source<TAB>target, found {len(fields)} tab-separated fields "
                                 "(or give the target side as a separate file)")
            for field in fields:
                check_line(field, where, max_chars)
            pairs.append(fields)
        return [s for s, _ in pairs], [t for _, t in pairs]
    sources, targets = read_lines(src_path, max_chars), read_lines(tgt_path, max_chars)
    if len(sources) != len(targets):
        raise UsageError(f"misaligned corpus: {src_path} has {len(sources)} lines, {tgt_path} has {len(targets)}")
    return sources, targets


class Vocabulary:
    """A sentencepiece model (ids: pad 0, bos 1, eos 2, unk 3), kept as its serialized bytes for checkpoints."""

    def __init__(self, model_bytes: bytes):
        import sentencepiece

        self.model_bytes = bytes(model_bytes)
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.model_bytes)
        except (RuntimeError, OSError) as error:
            raise UsageError(f"not a sentencepiece model ({error})") from None
        special = (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id(), self.processor.unk_id())
        if special != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise UsageError(f"sentencepiece model has pad/bos/eos/unk ids {special}, fastseq2seq needs "
                             f"{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)} (train it with pad_id=0 bos_id=1 eos_id=2 unk_id=3)")

    @classmethod
    def train(cls, sentences, vocab_size: int, model_type: str):
        import sentencepiece

        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            hard_vocab_limit=False,  # a small corpus gets fewer pieces instead of an error
            character_coverage=1.0, split_digits=True, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            num_threads=1,  # the same corpus gives the same model
            minloglevel=2)
        return cls(model.getvalue())

    @classmethod
    def load(cls, path):
        with open(path, "rb") as f:
            return cls(f.read())

    def __len__(self):
        return self.processor.get_piece_size()

    def encode(self, sentences) -> list:
        return self.processor.encode(list(sentences), out_type=int)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    def pieces(self, ids) -> list:
        return [self.processor.id_to_piece(int(i)) for i in ids]


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] int64, PAD after each sentence
    src_lengths: torch.Tensor  # [B]
    tgt_in: torch.Tensor  # [B, T]: BOS + target
    tgt_out: torch.Tensor  # [B, T]: target + EOS
    tokens: int  # target tokens (with EOS) of the whole global batch, over all ranks: the loss divisor

    def to(self, device):
        return Batch(self.src.to(device), self.src_lengths.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.tokens)


def pad(sequences, value=PAD_ID) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def source_batch(src_ids):
    """(src [B, S], src_lengths [B]) for decoding."""
    return pad(src_ids), torch.tensor([len(s) for s in src_ids], dtype=torch.long)


class BucketedBatches:
    """Global batches of at most `batch_tokens` padded tokens, sentences of similar length together.

    Epoch e's batches depend only on (seed, e): the position (epoch, index of the next batch) is all that
    resuming needs. Every rank builds the same global batches and takes rows rank::world_size of each, so
    N ranks see exactly the batches one process would.
    """

    def __init__(self, src_ids, tgt_ids, batch_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.batch_tokens, self.seed, self.rank, self.world_size = batch_tokens, seed, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = None

    def _cost(self, i):
        return max(len(self.src_ids[i]), len(self.tgt_ids[i]) + 1)

    def epoch_batches(self, epoch) -> list:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        shuffled = torch.randperm(len(self.src_ids), generator=generator).tolist()
        by_length = sorted(shuffled, key=self._cost)  # stable: equal lengths stay in shuffled order
        batches, current, longest = [], [], 0
        for i in by_length:
            longest_if_added = max(longest, self._cost(i))
            # at least world_size rows, so that every rank has a share of each batch
            over_budget = longest_if_added * (len(current) + 1) > self.batch_tokens
            if current and len(current) >= self.world_size and over_budget:
                batches.append(current)
                current, longest_if_added = [], self._cost(i)
            current.append(i)
            longest = longest_if_added
        if len(current) >= self.world_size or not batches:
            batches.append(current)
        else:
            batches[-1].extend(current)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in order]

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = None

    def next_batch(self) -> Batch:
        """The next global batch's rows for this rank; advances the position (and the epoch at its end)."""
        if self._order is None:
            self._order = self.epoch_batches(self.epoch)
        rows = self._order[self.index]
        self.index += 1
        if self.index == len(self._order):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return self.make_batch(rows)

    def make_batch(self, rows) -> Batch:
        """This rank's share (rows rank::world_size) of the global batch `rows`."""
        tokens = sum(len(self.tgt_ids[i]) + 1 for i in rows)
        mine = rows[self.rank :: self.world_size]
        src, src_lengths = source_batch([self.src_ids[i] for i in mine])
        tgt = [self.tgt_ids[i] for i in mine]
        return Batch(src, src_lengths, pad([[BOS_ID] + t for t in tgt]), pad([t + [EOS_ID] for t in tgt]), tokens)
