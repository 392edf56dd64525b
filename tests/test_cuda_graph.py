"""generate(cuda_graph=True): the decoding loop captured once per settings and replayed with new
inputs. On the CPU the capture backend is replaced by one that re-runs the recorded function into
the same static output buffers (what a graph replay does), which checks everything but the CUDA
graph itself: static inputs copied in, outputs copied out, one capture per settings. The CUDA
test runs the real graph where a GPU is present."""
import pytest
import torch

import mage_fast
from mage_fast.decoding import graph


class RerunBackend:
    """A stand-in for a CUDA graph: replay re-runs the captured function and writes its results
    into the buffers the capture returned."""
    captures = 0

    def capture(self, fn):
        RerunBackend.captures += 1
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self):
        for buf, new in zip(self.out, self.fn()):
            buf.copy_(new)
        return self.out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


@pytest.fixture
def rerun(monkeypatch):
    RerunBackend.captures = 0
    monkeypatch.setattr(graph, "backend_for", lambda device: RerunBackend())
    graph.clear()
    yield
    graph.clear()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_replays_give_the_eager_ids_for_new_inputs(tiny, rerun, mode):
    kw = dict(num_iter=5, temperature=4.5, rng="torch", mode=mode, return_ids=True)
    for seed in (0, 1, 2):
        _, eager = mage_fast.generate(tiny, 2, seed=seed, **kw)
        _, graphed = mage_fast.generate(tiny, 2, seed=seed, cuda_graph=True, **kw)
        assert torch.equal(eager, graphed), seed
    assert RerunBackend.captures == 1  # one capture, replayed with the new keys
    mage_fast.generate(tiny, 2, seed=0, cuda_graph=True, **{**kw, "temperature": 3.0})
    mage_fast.generate(tiny, 3, seed=0, cuda_graph=True, **kw)
    assert RerunBackend.captures == 3  # another temperature, another batch size: their own captures


def test_partial_starts_replay_with_their_known_tokens(tiny, rerun):
    mask = tiny.mask_token_label
    known = torch.randint(0, tiny.codebook_size, (2, tiny.seq_len), generator=torch.Generator().manual_seed(3))
    for first, second in ((0, 128), (128, 256)):
        init = known.clone()
        init[:, first:second] = mask
        kw = dict(num_iter=4, temperature=4.5, rng="torch", init_ids=init, return_ids=True)
        assert torch.equal(mage_fast.generate(tiny, 2, **kw)[1], mage_fast.generate(tiny, 2, cuda_graph=True, **kw)[1])
    assert RerunBackend.captures == 1  # same count of unknown tokens: the same graph, other inputs


def test_class_conditional_guided_replays_take_the_new_labels(rerun):
    from mage_fast.cli import load_model
    model, _ = load_model(None, None)
    model.eval()
    kw = dict(num_iter=6, temperature=1.0, rng="torch", guidance_scale=1.5, mode="cached_bf16", return_ids=True)
    for labels in ([0, 1, 2], [7, 8, 9]):
        cls = torch.tensor(labels)
        _, eager = mage_fast.generate(model, 3, class_ids=cls, **kw)
        _, graphed = mage_fast.generate(model, 3, class_ids=cls, cuda_graph=True, **kw)
        assert torch.equal(eager, graphed), labels
    assert RerunBackend.captures == 1


def test_refusals_are_one_clear_error(tiny):
    with pytest.raises(ValueError, match="CUDA device"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="torch", cuda_graph=True)
    with pytest.raises(ValueError, match="rng='torch'"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="official", cuda_graph=True)
    with pytest.raises(ValueError, match="return_trace"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="torch", cuda_graph=True, return_trace=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["exact", "cached_bf16", "fast"])
def test_cuda_graph_on_the_gpu_equals_eager(mode):
    torch.manual_seed(0)
    model = mage_fast.mage_vit_tiny().cuda().eval()
    graph.clear()
    kw = dict(num_iter=6, temperature=4.5, rng="torch", mode=mode, return_ids=True)
    for seed in (0, 1):
        _, eager = mage_fast.generate(model, 4, seed=seed, **kw)
        _, graphed = mage_fast.generate(model, 4, seed=seed, cuda_graph=True, **kw)
        assert torch.equal(eager, graphed), seed
