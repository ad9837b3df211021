"""`fastseq2seq demo`: the whole program on a task generated from language data shipped in packages.

Numbers written out by num2words and dates written out by Babel, in English, French and German, are translated
to their normalized form ("quatre mille trois cent vingt et un" -> "4321", "Samstag, 21. März 1987" ->
"1987-03-21"). The demo writes the corpus as TSV files, trains with `fastseq2seq train`'s code, then scores
the held-out set by exact match and plots the attention of one sentence and the training curves.
"""
import csv
import datetime
import os
import random

from fastseq2seq.config import make_config

LANGUAGES = ("en", "fr", "de")
SIZES = (20000, 500, 1000)  # train, valid, test
# The demo's training settings; configs/demo.yaml holds the same keys for `fastseq2seq train` (a test checks).
DEMO_SETTINGS = dict(
    vocab_size=600, vocab_model_type="bpe",
    emb_dim=96, hidden_size=192, attention="luong-general", dropout=0.0, tie_embeddings=False,
    batch_tokens=2000, lr=0.008, warmup_steps=100, label_smoothing=0.0, clip_norm=1.0, max_steps=3000,
    valid_every=100, valid_beam=1, metric="exact_match", stop_at_metric=0.992, patience=0, log_every=25, seed=1,
    # One thread: this model's matrices are too small for two threads to gain more than they lose in
    # synchronization, and on a busy 2-core machine two spinning threads are many times slower.
    threads=1, device="cpu")


def example(rng: random.Random):
    """(written-out text, normalized form): a number from 0 to 9999 or a date from 1900 to 2099."""
    from babel.dates import format_date
    from num2words import num2words

    language = rng.choice(LANGUAGES)
    if rng.random() < 0.7:  # numbers are the harder half (German compounds): give them more examples
        number = rng.randrange(10000)
        return num2words(number, lang=language), str(number)
    day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(73049))  # to 2099-12-31
    return format_date(day, format=rng.choice(("long", "full")), locale=language), day.isoformat()


def generate(sizes=SIZES, seed=1):
    """Disjoint train / valid / test lists of (source, target) pairs."""
    rng = random.Random(seed)
    seen, splits = set(), []
    for size in sizes:
        pairs = []
        while len(pairs) < size:
            pair = example(rng)
            if pair[0] not in seen:
                seen.add(pair[0])
                pairs.append(pair)
        splits.append(pairs)
    return splits


def write_tsv(pairs, path):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{source}\t{target}\n" for source, target in pairs)


def fresh_folder(out):
    """`out`, or out-2, out-3, ... when it already holds something: a demo never overwrites an earlier run."""
    candidate, number = out, 1
    while os.path.exists(candidate) and os.listdir(candidate):
        number += 1
        candidate = f"{out}-{number}"
    os.makedirs(os.path.join(candidate, "data"), exist_ok=True)
    return candidate


def plot_attention(model, vocab, source, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from fastseq2seq.data import EOS_ID, source_batch

    src_ids = vocab.encode([source])[0]
    src, src_lengths = source_batch([src_ids])
    model.eval()
    with torch.no_grad():
        tokens, lengths, attention = model.greedy(src, src_lengths, max_len=2 * len(src_ids) + 10)
    output = tokens[0, : int(lengths[0])].tolist()
    weights = attention[0, : len(output), : len(src_ids)].float().numpy()
    figure, axes = plt.subplots(figsize=(max(4, 0.45 * len(src_ids) + 2), max(3, 0.4 * len(output) + 1.5)))
    axes.imshow(weights, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    axes.set_xticks(range(len(src_ids)), vocab.pieces(src_ids), rotation=60, ha="right")
    axes.set_yticks(range(len(output)), [p if i != EOS_ID else "</s>" for i, p in zip(output, vocab.pieces(output))])
    axes.set_xlabel("source pieces")
    axes.set_ylabel("output pieces")
    axes.set_title(f"attention: {source}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_training_curve(log_path, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    valid = [(int(r["step"]), float(r["valid_loss"]), float(r["exact_match"])) for r in rows if r["valid_loss"]]
    figure, loss_axes = plt.subplots(figsize=(7, 4))
    loss_axes.plot([s for s, _ in train], [v for _, v in train], label="train loss")
    loss_axes.plot([s for s, _, _ in valid], [v for _, v, _ in valid], "o-", label="valid loss")
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("cross-entropy (nats/token)")
    match_axes = loss_axes.twinx()
    match_axes.plot([s for s, _, _ in valid], [m for _, _, m in valid], "s--", color="green", label="valid exact match")
    match_axes.set_ylabel("exact match")
    match_axes.set_ylim(0, 1.02)
    lines = loss_axes.get_legend_handles_labels()
    more = match_axes.get_legend_handles_labels()
    loss_axes.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(out, minutes, sizes=SIZES, **overrides):
    """Generate the corpus, train for at most `minutes`, score the held-out set; returns its exact match.
    `overrides` change training settings (tests train a few steps)."""
    from fastseq2seq import checkpoint
    from fastseq2seq.train import train
    from fastseq2seq.translate import scores, translate_sentences

    out = fresh_folder(out)
    train_pairs, valid_pairs, test_pairs = generate(sizes)
    for name, pairs in (("train", train_pairs), ("valid", valid_pairs), ("test", test_pairs)):
        write_tsv(pairs, os.path.join(out, "data", f"{name}.tsv"))
    print(f"demo: {len(train_pairs)} training pairs (numbers and dates written out in English, French and German "
          f"-> normalized), {len(test_pairs)} held out; writing to {out}", flush=True)
    settings = {**DEMO_SETTINGS, "train_src": os.path.join(out, "data", "train.tsv"),
                "valid_src": os.path.join(out, "data", "valid.tsv"), "out": out, "max_minutes": minutes, **overrides}
    train(make_config(settings))

    best = os.path.join(out, "best.pt")
    model, vocab = checkpoint.model_and_vocab(checkpoint.load(best), best)
    sources, references = [s for s, _ in test_pairs], [t for _, t in test_pairs]
    hypotheses = translate_sentences(model, vocab, sources)
    print("\nsample translations (held out):")
    for source, hypothesis, reference in list(zip(sources, hypotheses, references))[:8]:
        verdict = "ok" if hypothesis == reference else f"WRONG, expected {reference}"
        print(f"  {source}  ->  {hypothesis}   [{verdict}]")
    plot_attention(model, vocab, sources[0], os.path.join(out, "attention.png"))
    plot_training_curve(os.path.join(out, "log.csv"), os.path.join(out, "training_curve.png"))
    print(f"plots: {os.path.join(out, 'attention.png')}, {os.path.join(out, 'training_curve.png')}")
    exact = scores(hypotheses, references)["exact_match"]
    print(f"exact match: {exact:.4f}")
    return exact
