"""The `fastseq2seq` program: config, data, batching, checkpoints, train / resume, translate, evaluate, demo, bad input.

Models here are tiny and train for a few steps: these tests check the plumbing, not translation quality.
"""
import gzip
import io
import os
import select
import subprocess
import sys

import pytest
import torch

from fastseq2seq import checkpoint
from fastseq2seq.__main__ import main
from fastseq2seq.config import FIELDS, make_config
from fastseq2seq.data import EOS_ID, BOS_ID, BucketedBatches, Vocabulary, read_parallel
from fastseq2seq.train import lr_factor, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "zero one two three four five six seven eight nine".split()


def spell(number):
    return " ".join(WORDS[int(d)] for d in str(number))


def write(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Digits spelled out -> digits; train.src is gzipped, valid is a TSV."""
    folder = tmp_path_factory.mktemp("corpus")
    numbers = [(7 * i * i + 3 * i) % 10000 for i in range(1, 121)]
    return {"train_src": write(folder / "train.src.gz", [spell(n) for n in numbers[:100]], gzip.open),
            "train_tgt": write(folder / "train.tgt", [str(n) for n in numbers[:100]]),
            "valid_src": write(folder / "valid.tsv", [f"{spell(n)}\t{n}" for n in numbers[100:]]),
            "folder": folder}


def tiny(corpus, out, **changes):
    """Config values for a model that trains a step in milliseconds."""
    values = dict(train_src=corpus["train_src"], train_tgt=corpus["train_tgt"], valid_src=corpus["valid_src"],
                  out=str(out), vocab_size=40, emb_dim=16, hidden_size=24, dropout=0.1, batch_tokens=160,
                  warmup_steps=2, max_steps=4, valid_every=2, log_every=1, threads=1, lr=0.01)
    values.update(changes)
    return values


def flags(values):
    return [f"--{key.replace('_', '-')}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    train(make_config(tiny(corpus, out)))
    return out


def run_main(capsys, *argv):
    """(exit status, stdout, stderr) of main(argv) in this process."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *words):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastseq2seq: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


# ---- config ------------------------------------------------------------------------------------------------------

def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hidden_size: 64\nlr: 0.5\ninput_feeding: false\nstop_at_metric: null\n")
    from fastseq2seq.__main__ import _parser
    from fastseq2seq.config import config_from_args

    config = config_from_args(_parser().parse_args(["train", "--config", str(path), "--lr", "0.25",
                                                    "--train-src", "a.txt"]))
    assert (config.hidden_size, config.lr, config.input_feeding, config.train_src) == (64, 0.25, False, "a.txt")
    assert config.emb_dim == FIELDS["emb_dim"].default and config.stop_at_metric is None


@pytest.mark.parametrize("text, words", [("hiden_size: 3\n", ["unknown config key", "hiden_size", "hidden_size"]),
                                         ("lr: fast\n", ["lr"]),
                                         ("attention: cosine\n", ["attention", "cosine"]),
                                         ("lr: [1\n", ["not valid YAML"])])
def test_bad_config_file_is_one_line_error(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    status, _, err = run_main(capsys, "train", "--config", str(path))
    assert_one_line_error(status, err, *words)


def test_unknown_flag_is_one_line_error(capsys):
    status, _, err = run_main(capsys, "train", "--hidden-sise", "3")
    assert_one_line_error(status, err, "--hidden-sise")


def test_every_shipped_config_loads_and_demo_yaml_matches_the_demo():
    from fastseq2seq.config import load_yaml
    from fastseq2seq.demo import DEMO_SETTINGS

    files = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    assert {"demo.yaml", "multi30k_de_en.yaml"} <= set(files)
    for name in files:
        make_config(load_yaml(os.path.join(ROOT, "configs", name)))
    demo_yaml = load_yaml(os.path.join(ROOT, "configs", "demo.yaml"))
    for key in ("train_src", "valid_src", "out", "max_minutes"):  # where the demo writes, and its --minutes
        demo_yaml.pop(key)
    assert make_config(demo_yaml) == make_config(DEMO_SETTINGS)


# ---- data --------------------------------------------------------------------------------------------------------

def test_reads_gzip_and_tsv_alike(tmp_path):
    lines = ["ein Haus", "zwei Häuser"]
    targets = ["a house", "two houses"]
    gz = (write(tmp_path / "s.gz", lines, gzip.open), write(tmp_path / "t.txt", targets))
    tsv = write(tmp_path / "p.tsv", [f"{s}\t{t}" for s, t in zip(lines, targets)])
    assert read_parallel(*gz, 100) == read_parallel(tsv, "", 100) == (lines, targets)


BAD_DATA = {
    "missing file": (lambda d: (str(d / "nope.txt"), write(d / "t", ["x"])), ["nope.txt", "no such file"]),
    "misaligned": (lambda d: (write(d / "s", ["a", "b", "c"]), write(d / "t", ["a", "b"])),
                   ["misaligned", "3 lines", "2"]),
    "empty line": (lambda d: (write(d / "s", ["a", "", "c"]), write(d / "t", ["a", "b", "c"])), ["line 2", "empty"]),
    "over-long line": (lambda d: (write(d / "s", ["a", "b" * 2000]), write(d / "t", ["a", "b"])),
                       ["line 2", "max_chars"]),
    "invalid utf-8": (lambda d: ((d / "s").write_bytes(b"ok\nbad \xff\xfe here\n") and str(d / "s"),
                                 write(d / "t", ["a", "b"])), ["line 2", "UTF-8"]),
    "tsv without tab": (lambda d: (write(d / "p.tsv", ["a\tb", "c d"]), ""), ["line 2", "TAB"]),
    "truncated gzip": (lambda d: ((d / "s.gz").write_bytes(gzip.compress(b"a\nb\n" * 500)[:40]) and str(d / "s.gz"),
                                  write(d / "t", ["a"])), ["s.gz"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_is_one_line_error_and_writes_nothing(tmp_path, capsys, corpus, case):
    make_paths, words = BAD_DATA[case]
    src, tgt = make_paths(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("written before")
    status, _, err = run_main(capsys, "train", *flags(tiny(corpus, out, train_src=src, train_tgt=tgt)))
    assert_one_line_error(status, err, *words)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "written before"


def test_a_folder_with_an_earlier_best_checkpoint_is_not_reused(tmp_path, capsys, corpus):
    (tmp_path / "best.pt").write_bytes(b"an earlier run's checkpoint")
    status, _, err = run_main(capsys, "train", *flags(tiny(corpus, tmp_path)))
    assert_one_line_error(status, err, "best.pt exists")
    assert (tmp_path / "best.pt").read_bytes() == b"an earlier run's checkpoint"


def test_error_in_a_fresh_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastseq2seq", "train", "--config", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("fastseq2seq: error: ") and len(result.stderr.strip().splitlines()) == 1


# ---- batching ----------------------------------------------------------------------------------------------------

def test_batches_respect_the_token_budget_and_cover_each_sentence_once_per_epoch():
    generator = torch.Generator().manual_seed(0)
    src = [[5] * int(n) for n in torch.randint(1, 30, (300,), generator=generator)]
    tgt = [[6] * int(n) for n in torch.randint(1, 30, (300,), generator=generator)]
    batches = BucketedBatches(src, tgt, batch_tokens=200, seed=3)
    epoch0 = batches.epoch_batches(0)
    assert sorted(i for rows in epoch0 for i in rows) == list(range(300))
    for rows in epoch0:
        assert len(rows) * max(max(len(src[i]), len(tgt[i]) + 1) for i in rows) <= 200
    assert epoch0 == batches.epoch_batches(0) != batches.epoch_batches(1)
    batch = batches.make_batch(epoch0[0])
    assert (batch.tgt_in[:, 0] == BOS_ID).all() and batch.src.shape[0] == len(epoch0[0])
    assert (batch.tgt_out.gather(1, batch.src_lengths.new_tensor([len(tgt[i]) for i in epoch0[0]])[:, None])
            == EOS_ID).all()


def test_position_resumes_and_ranks_split_each_global_batch():
    src = [[4] * (1 + i % 7) for i in range(50)]
    tgt = [[5] * (1 + i % 5) for i in range(50)]
    straight = BucketedBatches(src, tgt, 40, seed=1)
    seen = [straight.next_batch().src.tolist() for _ in range(30)]  # crosses epochs
    resumed = BucketedBatches(src, tgt, 40, seed=1)
    for _ in range(11):
        resumed.next_batch()
    position = resumed.state_dict()
    again = BucketedBatches(src, tgt, 40, seed=1)
    again.load_state_dict(position)
    assert [again.next_batch().src.tolist() for _ in range(19)] == seen[11:]
    ranks = [BucketedBatches(src, tgt, 40, seed=1, rank=r, world_size=2) for r in range(2)]
    whole = BucketedBatches(src, tgt, 40, seed=1).next_batch()
    halves = [r.next_batch() for r in ranks]
    assert halves[0].tokens == halves[1].tokens == whole.tokens
    assert sum(h.src.shape[0] for h in halves) == whole.src.shape[0]


# ---- training, checkpoints, resume -------------------------------------------------------------------------------

def test_lr_warms_up_then_decays():
    assert lr_factor(1, 4) == 0.25 and lr_factor(4, 4) == 1.0 and lr_factor(16, 4) == 0.5


def test_training_writes_loadable_checkpoints_and_logs(trained):
    state = torch.load(trained / "last.pt", weights_only=True)
    assert state["step"] == 4 and (trained / "best.pt").exists()
    model, vocab = checkpoint.model_and_vocab(state, "last.pt")
    assert model.config == state["model_config"] and len(vocab) == state["model_config"]["tgt_vocab_size"]
    log = (trained / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 1 + 4 + 2  # a row per step and per validation
    assert any(name.startswith("events.") for name in os.listdir(trained / "tensorboard"))
    assert not [name for name in os.listdir(trained) if name.endswith(".tmp")]


def test_resume_continues_exactly(corpus, tmp_path):
    straight = train(make_config(tiny(corpus, tmp_path / "straight", max_steps=6)))
    train(make_config(tiny(corpus, tmp_path / "split", max_steps=2)))
    resumed = train(make_config(tiny(corpus, tmp_path / "split", max_steps=6)), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert split["step"] == 6 and split["data"] == torch.load(tmp_path / "straight" / "last.pt")["data"]


def test_interrupt_saves_last_and_resume_is_exact(corpus, tmp_path, monkeypatch):
    import signal

    from fastseq2seq.config import Interrupted
    from fastseq2seq.train import Trainer

    straight = train(make_config(tiny(corpus, tmp_path / "straight", max_steps=5, valid_every=10)))
    one_step = Trainer.train_step

    def step_then_ctrl_c(self):
        result = one_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    with pytest.raises(Interrupted, match="step 2"):
        train(make_config(tiny(corpus, tmp_path / "cut", max_steps=5, valid_every=10)))
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 2
    resumed = train(make_config(tiny(corpus, tmp_path / "cut", max_steps=5, valid_every=10)), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_existing_run_is_never_overwritten(corpus, trained, capsys):
    before = (trained / "last.pt").read_bytes()
    status, _, err = run_main(capsys, "train", *flags(tiny(corpus, trained)))
    assert_one_line_error(status, err, "last.pt exists", "--resume")
    assert (trained / "last.pt").read_bytes() == before


def test_resume_with_another_vocabulary_is_an_error(corpus, trained, tmp_path, capsys):
    other = Vocabulary.train(["quite different text here"] * 20 + ["more words"], 20, "unigram")
    (tmp_path / "other.model").write_bytes(other.model_bytes)
    before = (trained / "last.pt").read_bytes()
    other_vocab = tiny(corpus, trained, vocab=tmp_path / "other.model")
    status, _, err = run_main(capsys, "train", "--resume", *flags(other_vocab))
    assert_one_line_error(status, err, "another vocabulary")
    assert (trained / "last.pt").read_bytes() == before


@pytest.fixture
def broken_checkpoints(trained, tmp_path):
    good = (trained / "best.pt").read_bytes()
    state = torch.load(trained / "best.pt", weights_only=True)
    state["vocab"] = Vocabulary.train(["some other words entirely"] * 20 + ["x y z"], 20, "unigram").model_bytes
    torch.save(state, tmp_path / "other_vocab.pt")
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.pt").write_bytes(bytes(range(256)) * 50)
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    return {"another vocabulary": tmp_path / "other_vocab.pt", "corrupt or truncated": tmp_path / "truncated.pt",
            "corrupt": tmp_path / "corrupt.pt", "not a fastseq2seq checkpoint": tmp_path / "foreign.pt",
            "no such file": tmp_path / "missing.pt"}


@pytest.mark.parametrize("problem", ["another vocabulary", "corrupt or truncated", "corrupt",
                                     "not a fastseq2seq checkpoint", "no such file"])
def test_bad_checkpoint_is_one_line_error(broken_checkpoints, corpus, capsys, problem):
    path = str(broken_checkpoints[problem])
    status, out, err = run_main(capsys, "evaluate", "--checkpoint", path, "--src", corpus["train_src"],
                                "--ref", corpus["train_tgt"])
    assert_one_line_error(status, err, problem, os.path.basename(path))
    assert out == ""


def test_resume_from_a_truncated_last_checkpoint_keeps_it(corpus, trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    truncated = (trained / "last.pt").read_bytes()[:1000]
    (run / "last.pt").write_bytes(truncated)
    status, _, err = run_main(capsys, "train", "--resume", *flags(tiny(corpus, run)))
    assert_one_line_error(status, err, "corrupt or truncated")
    assert (run / "last.pt").read_bytes() == truncated


# ---- translate, evaluate -----------------------------------------------------------------------------------------

def test_translate_streams_one_line_per_input_line(trained, capsys, monkeypatch):
    lines = [spell(n) for n in (12, 345, 6789)] * 100 + ["", spell(5)]  # more than one streamed chunk
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n")))
    status, out, err = run_main(capsys, "translate", "--checkpoint", str(trained / "best.pt"), "--beam", "2")
    assert status == 0, err
    outputs = out.split("\n")[:-1]
    assert len(outputs) == len(lines) and outputs[-2] == ""
    assert outputs[0] == outputs[3] and "▁" not in out  # batched consistently; detokenized


def test_translate_answers_each_line_before_more_input_arrives(trained):
    # A pipe kept open, as from an interactive user: the translation must come before the input ends.
    proc = subprocess.Popen([sys.executable, "-m", "fastseq2seq", "translate", "--checkpoint",
                             str(trained / "best.pt")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write((spell(12) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no translation within 60 s while the input stayed open"
        assert proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_translate_rejects_invalid_utf8_input(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one two\n\xff\xfe\n")))
    status, _, err = run_main(capsys, "translate", "--checkpoint", str(trained / "best.pt"))
    assert_one_line_error(status, err, "input line 2", "UTF-8")


def test_evaluate_prints_bleu_and_chrf_with_signatures(trained, corpus, capsys):
    status, out, err = run_main(capsys, "evaluate", "--checkpoint", str(trained / "best.pt"), "--beam", "1",
                                "--src", corpus["train_src"], "--ref", corpus["train_tgt"])
    assert status == 0, err
    bleu, chrf, exact = out.strip().splitlines()
    assert bleu.startswith("BLEU ") and "nrefs:1|case:mixed" in bleu and "tok:13a" in bleu
    assert chrf.startswith("chrF ") and "nc:6|nw:0" in chrf
    assert 0.0 <= float(exact.split(": ")[1]) <= 1.0


# ---- demo --------------------------------------------------------------------------------------------------------

def test_demo_runs_end_to_end(tmp_path, capsys):
    from fastseq2seq.demo import run_demo

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("an earlier demo")
    exact = run_demo(str(tmp_path / "demo"), minutes=1, sizes=(200, 20, 30), max_steps=3, valid_every=3)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"exact match: {exact:.4f}"
    assert (tmp_path / "demo" / "keep.txt").read_text() == "an earlier demo"  # a new folder: demo-2
    for name in ("attention.png", "training_curve.png", "best.pt"):
        assert (tmp_path / "demo-2" / name).read_bytes()[:4] in (b"\x89PNG", b"PK\x03\x04"), name


# ---- distributed -------------------------------------------------------------------------------------------------

def _ddp_rank(rank, values, port, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    model = train(make_config(values))
    torch.save(model.state_dict(), os.path.join(folder, f"rank{rank}.pt"))


def test_two_gloo_ranks_stay_identical_and_match_one_process(corpus, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = tiny(corpus, tmp_path / "ddp", dropout=0.0, max_steps=3, valid_every=3, device="cpu")
    mp.spawn(_ddp_rank, args=(values, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train(make_config({**values, "out": str(tmp_path / "single")})).state_dict()
    assert (tmp_path / "ddp" / "last.pt").exists()
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
