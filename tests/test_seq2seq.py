import itertools
import json
import math
import time

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq2seq
from fastseq2seq.models import Seq2Seq, sequence_loss

PAD, BOS, EOS = 0, 1, 2
TOL64 = dict(atol=1e-9, rtol=1e-7)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are tiny: more threads only add OpenMP waits, which on a busy machine cost seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PlainSeq2Seq(torch.nn.Module):
    """The same model written from its equations on torch.nn.LSTM / LSTMCell and eager attention math, with the
    same parameter names, so it loads Seq2Seq's state_dict."""

    def __init__(self, src_vocab, tgt_vocab, emb, hidden, layers, attention, input_feeding, tie):
        super().__init__()
        self.kind, self.input_feeding, self.layers = attention, input_feeding, layers
        A = emb if tie else hidden
        self.src_embedding = torch.nn.Embedding(src_vocab, emb, padding_idx=PAD)
        self.tgt_embedding = torch.nn.Embedding(tgt_vocab, emb, padding_idx=PAD)
        self.encoder = torch.nn.LSTM(emb, hidden // 2, layers, batch_first=True, bidirectional=True)
        self.bridge_h = torch.nn.Linear(hidden, hidden)
        self.bridge_c = torch.nn.Linear(hidden, hidden)
        first = emb + (hidden if attention == "bahdanau" else 0) + (A if input_feeding else 0)
        self.decoder = torch.nn.ModuleList(torch.nn.LSTMCell(first if l == 0 else hidden, hidden)
                                           for l in range(layers))
        self.attention = torch.nn.Module()
        if attention == "bahdanau":
            self.attention.query_proj = torch.nn.Linear(hidden, hidden, bias=False)
            self.attention.key_proj = torch.nn.Linear(hidden, hidden)
            self.attention.v = torch.nn.Parameter(torch.empty(hidden))
        elif attention == "luong-general":
            self.attention.weight = torch.nn.Parameter(torch.empty(hidden, hidden))
        self.attn_combine = torch.nn.Linear(2 * hidden, A, bias=False)
        self.output = torch.nn.Linear(A, tgt_vocab)
        if tie:
            self.output.weight = self.tgt_embedding.weight

    def attend(self, q, memory, mask):
        a = self.attention
        if self.kind == "bahdanau":
            scores = torch.tanh(a.query_proj(q)[:, None, :] + a.key_proj(memory)) @ a.v
        elif self.kind == "luong-general":
            scores = torch.einsum("bsk,kq,bq->bs", memory, a.weight, q)
        else:
            scores = torch.einsum("bsh,bh->bs", memory, q)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return torch.einsum("bs,bsh->bh", weights, memory)

    def forward(self, src, src_lengths, tgt_in):
        B, S = src.shape
        packed = pack_padded_sequence(self.src_embedding(src), src_lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)
        mask = torch.arange(S)[None, :] < src_lengths[:, None]
        h = [torch.tanh(self.bridge_h(torch.cat([h_n[2 * l], h_n[2 * l + 1]], 1))) for l in range(self.layers)]
        c = [self.bridge_c(torch.cat([c_n[2 * l], c_n[2 * l + 1]], 1)) for l in range(self.layers)]
        feed = memory.new_zeros(B, self.attn_combine.out_features)
        logits = []
        for t in range(tgt_in.shape[1]):
            x = [self.tgt_embedding(tgt_in[:, t])]
            if self.kind == "bahdanau":
                context = self.attend(h[-1], memory, mask)
                x.append(context)
            if self.input_feeding:
                x.append(feed)
            x = torch.cat(x, 1)
            for l, cell in enumerate(self.decoder):
                h[l], c[l] = cell(x, (h[l], c[l]))
                x = h[l]
            if self.kind != "bahdanau":
                context = self.attend(x, memory, mask)
            feed = torch.tanh(self.attn_combine(torch.cat([context, x], 1)))
            logits.append(self.output(feed))
        return torch.stack(logits, 1)


def smoothed_loss(logits, target, eps):
    """Label-smoothed cross-entropy written out: (1 - eps) * NLL + eps * mean over the vocabulary of -log p."""
    log_p = torch.log_softmax(logits, -1)
    per_token = -(1 - eps) * log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1) - eps * log_p.mean(-1)
    real = target != PAD
    return per_token[real].sum() / real.sum()


def make_model(seed=0, dtype=torch.float64, src_vocab=14, tgt_vocab=12, **kw):
    torch.manual_seed(seed)
    kw = {"emb_dim": 8, "hidden_size": 16, **kw}
    return Seq2Seq(src_vocab, tgt_vocab, **kw).to(dtype)


def make_batch(B=4, S=7, T=6, src_vocab=14, tgt_vocab=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    src = torch.randint(3, src_vocab, (B, S), generator=g).masked_fill(torch.arange(S) >= lengths[:, None], PAD)
    tgt = torch.randint(3, tgt_vocab, (B, T + 1), generator=g)
    tgt_lengths = torch.randint(1, T + 1, (B,), generator=g)
    tgt[torch.arange(B), tgt_lengths] = EOS
    tgt = tgt.masked_fill(torch.arange(T + 1) > tgt_lengths[:, None], PAD)
    tgt[:, 0] = BOS
    return src, lengths, tgt[:, :-1], tgt[:, 1:]


CONFIGS = [dict(attention=a, input_feeding=f, num_layers=l, tie_embeddings=tie)
           for (a, f), l, tie in zip(itertools.product(["bahdanau", "luong-dot", "luong-general"], [True, False]),
                                     [1, 2, 1, 2, 2, 1], [False, True, True, False, False, True])]


def config_id(config):
    return "-".join(str(v) for v in config.values())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_plain_pytorch_model(config):
    check_against_plain_model(config)


@pytest.mark.parametrize("backend", [b for b in fastseq2seq.available_backends("cpu") if b != "cpu"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=config_id)
def test_matches_plain_pytorch_model_on_other_backends(backend, config):
    """The default CPU backend is covered above; the model's path through the others (triton: what a GPU runs)."""
    with fastseq2seq.use_backend(backend):
        check_against_plain_model(config)


def check_against_plain_model(config):
    model = make_model(**config)
    plain = PlainSeq2Seq(14, 12, 8, 16, config["num_layers"], config["attention"], config["input_feeding"],
                         config["tie_embeddings"]).double()
    plain.load_state_dict(model.state_dict())
    src, lengths, tgt_in, tgt_out = make_batch()
    logits = model(src, lengths, tgt_in)
    expected = plain(src, lengths, tgt_in)
    torch.testing.assert_close(logits, expected, **TOL64)
    loss, n_tokens = sequence_loss(logits, tgt_out, pad_id=PAD, label_smoothing=0.1)
    expected_loss = smoothed_loss(expected, tgt_out, 0.1)
    assert n_tokens == (tgt_out != PAD).sum()
    torch.testing.assert_close(loss, expected_loss, **TOL64)
    loss.backward()
    expected_loss.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, **TOL64, msg=lambda m: f"{name}: {m}")


def test_config_round_trip():
    model = make_model(attention="luong-general", num_layers=2, tie_embeddings=True)
    config = json.loads(json.dumps(model.config))
    clone = Seq2Seq.from_config(config)
    assert clone.config == model.config
    clone.double().load_state_dict(model.state_dict())
    src, lengths, tgt_in, _ = make_batch()
    torch.testing.assert_close(clone(src, lengths, tgt_in), model(src, lengths, tgt_in), **TOL64)


def decoding_model(config, src, lengths, max_len=9, **kw):
    """A random model whose greedy outputs on (src, lengths) end at >= 3 different steps, some at max_len: weights
    scaled up so outputs depend on the input and the step, and an EOS bias from a fixed search."""
    for seed, boost in itertools.product(range(8), [0.0, 1.0, 2.0, -1.0, 3.0]):
        model = make_model(seed=seed, **config, **kw).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5.0)
            model.output.bias[EOS] += boost
        out_lengths = model.greedy(src, lengths, max_len=max_len)[1]
        if len(set(out_lengths.tolist())) >= 3 and out_lengths.max() == max_len:
            return model
    raise AssertionError("no model with varied output lengths found: the decoding tests would check too little")


def teacher_forced_log_probs(model, src, lengths, tokens):
    """log p of tokens [B, L] under teacher forcing, per position."""
    tgt_in = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], 1)
    with torch.no_grad():
        logits = model(src, lengths, tgt_in)
    return logits, torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=config_id)
def test_greedy_is_teacher_forced_argmax_of_its_tokens(config):
    src, lengths, _, _ = make_batch(B=6, seed=3)
    model = decoding_model(config, src, lengths)
    tokens, out_lengths, attention = model.greedy(src, lengths, max_len=9)
    B, L = tokens.shape
    assert attention.shape == (B, L, src.shape[1])
    logits, _ = teacher_forced_log_probs(model, src, lengths, tokens)
    steps = torch.arange(L)[None, :]
    real = steps < out_lengths[:, None]
    assert torch.equal(tokens[real], logits.argmax(-1)[real])
    assert (tokens[~real] == PAD).all()
    for b in range(B):
        n = int(out_lengths[b])
        ends_with_eos = tokens[b, n - 1] == EOS
        assert ends_with_eos or n == 9
        assert not (tokens[b, :n - 1] == EOS).any()
    src_real = torch.arange(src.shape[1])[None, None, :] < lengths[:, None, None]
    assert (attention.masked_select(~src_real.expand_as(attention)) == 0).all()
    assert (attention[~real] == 0).all()
    torch.testing.assert_close(attention.sum(-1)[real], torch.ones(int(real.sum()), dtype=attention.dtype))


@pytest.mark.parametrize("attention", ["bahdanau", "luong-dot"])
def test_decoding_alone_equals_in_padded_batch(attention):
    src, lengths, _, _ = make_batch(B=5, seed=4)
    model = decoding_model(dict(attention=attention, num_layers=2), src, lengths)
    tokens, out_lengths, weights = model.greedy(src, lengths, max_len=9)
    beam_tokens, beam_lengths, beam_scores = model.beam_search(src, lengths, beam_size=3, n_best=2, max_len=9)
    for b in range(src.shape[0]):
        alone = src[b:b + 1, :int(lengths[b])]
        t, n, w = model.greedy(alone, lengths[b:b + 1], max_len=9)
        assert torch.equal(t[0], tokens[b, :t.shape[1]]) and n[0] == out_lengths[b]
        torch.testing.assert_close(w[0], weights[b, :w.shape[1], :alone.shape[1]], **TOL64)
        bt, bn, bs = model.beam_search(alone, lengths[b:b + 1], beam_size=3, n_best=2, max_len=9)
        assert torch.equal(bt[0], beam_tokens[b, :, :bt.shape[2]]) and torch.equal(bn[0], beam_lengths[b])
        torch.testing.assert_close(bs[0], beam_scores[b], **TOL64)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_beam_size_one_equals_greedy(config):
    src, lengths, _, _ = make_batch(B=6, seed=5)
    model = decoding_model(config, src, lengths)
    tokens, out_lengths, _ = model.greedy(src, lengths, max_len=9)
    beam_tokens, beam_lengths, _ = model.beam_search(src, lengths, beam_size=1, max_len=9)
    assert torch.equal(beam_tokens[:, 0], tokens) and torch.equal(beam_lengths[:, 0], out_lengths)


def test_cuda_graph_decoding_needs_a_cuda_device():
    src, lengths, _, _ = make_batch()
    model = make_model().eval()
    with pytest.raises(ValueError, match="greedy: cuda_graph=True needs .* CUDA device"):
        model.greedy(src, lengths, cuda_graph=True)
    with pytest.raises(ValueError, match="beam_search: cuda_graph=True needs .* CUDA device"):
        model.beam_search(src, lengths, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=config_id)
def test_cuda_graph_decoding_equals_eager_decoding(backend, config):
    """max_len 21 = an eager interval of 8 steps, a captured one, then 5 eager steps (unless all rows end sooner);
    the captured steps must do exactly what the eager ones do."""
    if backend not in fastseq2seq.available_backends("cuda"):
        pytest.skip(f"{backend} on cuda is not available")
    src, lengths, _, _ = make_batch(B=6, seed=3)
    model = decoding_model(config, src, lengths, dtype=torch.float32).cuda()
    src, lengths = src.cuda(), lengths.cuda()
    decoders = {"greedy": lambda **kw: model.greedy(src, lengths, max_len=21, **kw),
                "beam": lambda **kw: model.beam_search(src, lengths, beam_size=3, n_best=2, max_len=21, **kw)}
    with fastseq2seq.use_backend(backend):
        for name, decode in decoders.items():
            (tokens, out_lengths, floats), (g_tokens, g_lengths, g_floats) = decode(), decode(cuda_graph=True)
            assert torch.equal(g_tokens, tokens) and torch.equal(g_lengths, out_lengths), name
            torch.testing.assert_close(g_floats, floats, msg=lambda m: f"{name}: {m}")
        tokens, out_lengths, _ = model.greedy(src, lengths, max_len=21, cuda_graph=True)
        logits, _ = teacher_forced_log_probs(model, src, lengths, tokens)
        real = torch.arange(tokens.shape[1], device="cuda")[None, :] < out_lengths[:, None]
        assert torch.equal(tokens[real], logits.argmax(-1)[real])


def sequence_scores(model, src, lengths, tokens, out_lengths, length_penalty):
    _, log_p = teacher_forced_log_probs(model, src, lengths, tokens)
    real = torch.arange(tokens.shape[1])[None, :] < out_lengths[:, None]
    return (log_p * real).sum(1) / ((5 + out_lengths.to(log_p.dtype)) / 6) ** length_penalty


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_scores_are_the_models_log_probs(length_penalty):
    src, lengths, _, _ = make_batch(B=4, seed=6)
    model = decoding_model(dict(attention="luong-general"), src, lengths, max_len=8)
    tokens, out_lengths, scores = model.beam_search(src, lengths, beam_size=4, n_best=3, max_len=8,
                                                    length_penalty=length_penalty)
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "n-best not sorted"
    for k in range(3):
        expected = sequence_scores(model, src, lengths, tokens[:, k], out_lengths[:, k], length_penalty)
        torch.testing.assert_close(scores[:, k], expected, **TOL64)
        assert (tokens[:, k][torch.arange(tokens.shape[2])[None, :] >= out_lengths[:, k, None]] == PAD).all()


@pytest.mark.parametrize("eos_bias", [1.0, -0.5, -2.0], ids=["short-optimum", "mixed", "long-optimum"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum(length_penalty, eos_bias):
    V, max_len = 4, 5  # tokens pad, bos, eos and one other; every token may be emitted
    model = make_model(tgt_vocab=V, attention="bahdanau").eval()
    with torch.no_grad():
        model.output.bias[EOS] += eos_bias
    src, lengths, _, _ = make_batch(B=3, seed=7)
    # Every hypothesis: ending at its first EOS, or max_len tokens without EOS.
    hypotheses = [h for n in range(1, max_len + 1) for h in itertools.product(range(V), repeat=n)
                  if (h[-1] == EOS or n == max_len) and EOS not in h[:-1]]
    padded = torch.tensor([list(h) + [PAD] * (max_len - len(h)) for h in hypotheses])
    hyp_lengths = torch.tensor([len(h) for h in hypotheses])
    n_best = 3
    tokens, out_lengths, scores = model.beam_search(src, lengths, beam_size=len(hypotheses), n_best=n_best,
                                                    max_len=max_len, length_penalty=length_penalty)
    for b in range(src.shape[0]):
        n = len(hypotheses)
        all_scores = sequence_scores(model, src[b:b + 1].expand(n, -1), lengths[b:b + 1].expand(n), padded,
                                     hyp_lengths, length_penalty)
        best = all_scores.topk(n_best).indices
        torch.testing.assert_close(scores[b], all_scores[best], **TOL64)
        assert torch.equal(out_lengths[b], hyp_lengths[best])
        assert torch.equal(tokens[b], padded[best][:, :tokens.shape[2]])


def digit_reversal_batch(g, B, max_digits=6):
    """Source: 1..max_digits digits (tokens 3..12); target: the digits reversed, then EOS."""
    lengths = torch.randint(1, max_digits + 1, (B,), generator=g)
    digits = torch.randint(3, 13, (B, max_digits), generator=g)
    real = torch.arange(max_digits)[None, :] < lengths[:, None]
    src = digits.masked_fill(~real, PAD)
    reversed_index = (lengths[:, None] - 1 - torch.arange(max_digits)[None, :]).clamp(min=0)
    tgt = torch.cat([digits.gather(1, reversed_index).masked_fill(~real, PAD), torch.zeros(B, 1, dtype=torch.long)], 1)
    tgt[torch.arange(B), lengths] = EOS
    return src, lengths, tgt


def test_learns_to_reverse_digit_strings():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Seq2Seq(13, 13, emb_dim=16, hidden_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for step in range(300):
        src, lengths, tgt = digit_reversal_batch(g, 64)
        tgt_in = torch.cat([torch.full((64, 1), BOS), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)
        loss, _ = sequence_loss(model(src, lengths, tgt_in), tgt, pad_id=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    src, lengths, tgt = digit_reversal_batch(torch.Generator().manual_seed(12345), 1000)
    tokens, out_lengths, _ = model.greedy(src, lengths)
    correct = (out_lengths == lengths + 1) & (tokens[:, :tgt.shape[1]] == tgt[:, :tokens.shape[1]]).all(1)
    accuracy = correct.double().mean().item()
    assert accuracy >= 0.99, f"exact match {accuracy:.3f} after {train_seconds:.0f} s of training"
    assert train_seconds < 60, f"training took {train_seconds:.0f} s"
