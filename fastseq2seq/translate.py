"""Decoding (greedy or beam search, batched by length), `fastseq2seq translate` and `fastseq2seq evaluate`."""
import select
import sys

import torch

from fastseq2seq import checkpoint
from fastseq2seq.config import UsageError
from fastseq2seq.data import EOS_ID, check_line, decode_line, read_lines, source_batch

STREAM_LINES = 256  # translate batches up to this many lines, fewer when no more input has arrived yet


@torch.no_grad()
def translate_ids(model, src_ids, *, beam=1, batch_sentences=64, device="cpu"):
    """Target ids (without BOS/EOS) for each source id list, in input order; similar lengths decoded together."""
    model.eval()
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    results = [None] * len(src_ids)
    for start in range(0, len(order), batch_sentences):
        rows = order[start : start + batch_sentences]
        src, src_lengths = source_batch([src_ids[i] for i in rows])
        src, src_lengths = src.to(device), src_lengths.to(device)
        max_len = 2 * src.shape[1] + 10
        if beam > 1:
            tokens, lengths, _ = model.beam_search(src, src_lengths, beam_size=beam, max_len=max_len)
            tokens, lengths = tokens[:, 0], lengths[:, 0]
        else:
            tokens, lengths, _ = model.greedy(src, src_lengths, max_len=max_len)
        for row, ids, length in zip(rows, tokens.tolist(), lengths.tolist()):
            ids = ids[:length]
            results[row] = ids[:-1] if ids and ids[-1] == EOS_ID else ids
    return results


def translate_sentences(model, vocab, sentences, *, beam=1, device="cpu"):
    hypotheses = translate_ids(model, vocab.encode(sentences), beam=beam, device=device)
    return [vocab.decode(ids) for ids in hypotheses]


def scores(hypotheses, references) -> dict:
    """Corpus sacreBLEU and chrF (with their signatures) and the fraction of exact matches."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    exact = sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score, "bleu_signature": str(bleu.get_signature()),
            "chrf": chrf.corpus_score(hypotheses, [references]).score, "chrf_signature": str(chrf.get_signature()),
            "exact_match": exact}


def pick_device(name="auto"):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def load_for_decoding(path, device):
    model, vocab = checkpoint.model_and_vocab(checkpoint.load(path), path)
    return model.to(device), vocab


def input_pending(stream) -> bool:
    """False when reading on would wait (a pipe or terminal with nothing more yet): answer what has come first."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError, TypeError, AttributeError):  # not backed by a file descriptor: never waits
        return True


def translate_stream(model, vocab, lines, output, *, beam, device, max_chars):
    """Translate raw byte lines in chunks, writing and flushing each chunk's translations."""
    chunk = []

    def flush():
        sentences = [line for line in chunk if line.strip()]
        translated = iter(translate_sentences(model, vocab, sentences, beam=beam, device=device))
        for line in chunk:  # an empty input line gives an empty output line, keeping the lines aligned
            output.write((next(translated) if line.strip() else "") + "\n")
        output.flush()
        chunk.clear()

    for number, raw in enumerate(lines, 1):
        line = decode_line(raw, f"input line {number}")
        if line.strip():
            check_line(line, f"input line {number}", max_chars)
        chunk.append(line)
        if len(chunk) == STREAM_LINES or not input_pending(lines):
            flush()
    if chunk:
        flush()


def run_translate(args):
    device = pick_device(args.device)
    model, vocab = load_for_decoding(args.checkpoint, device)
    translate_stream(model, vocab, sys.stdin.buffer, sys.stdout, beam=args.beam, device=device,
                     max_chars=args.max_chars)


def run_evaluate(args):
    device = pick_device(args.device)
    model, vocab = load_for_decoding(args.checkpoint, device)
    sources, references = read_lines(args.src, args.max_chars), read_lines(args.ref, args.max_chars)
    if len(sources) != len(references):
        raise UsageError(f"misaligned corpus: {args.src} has {len(sources)} lines, {args.ref} has {len(references)}")
    result = scores(translate_sentences(model, vocab, sources, beam=args.beam, device=device), references)
    print(f"BLEU {result['bleu']:.2f}  {result['bleu_signature']}")
    print(f"chrF {result['chrf']:.2f}  {result['chrf_signature']}")
    print(f"exact match: {result['exact_match']:.4f}")
