"""stable_token: factories defined in a script or notebook keep their token across processes."""
import functools
import subprocess
import sys
import textwrap

import torch

from dask_imgcurator.models.tokens import stable_token

SCRIPT = textwrap.dedent('''
    import torch
    from dask.base import tokenize
    import dask_imgcurator as ic
    from dask_imgcurator.decode import PreprocessSpec

    class ColourStats(torch.nn.Module):
        def forward(self, pixels):
            return pixels.mean(dim=(2, 3))

    def factory():
        return ColourStats()

    class Brightness(torch.nn.Module):
        def forward(self, emb):
            return emb[:, :3].mean(dim=1)

    def brightness_head(in_dim, *, clip_name, model_dir, cache_dir, offline):
        return Brightness()

    encoder = ic.custom_model(ColourStats, PreprocessSpec(size=64), embed_dim=3, name="colour")
    by_function = ic.custom_model(factory, PreprocessSpec(size=64), embed_dim=3, name="colour")
    head = ic.register_head("brightness", brightness_head)
    print(tokenize(encoder), tokenize(by_function), tokenize(head))
''')


def test_custom_models_and_heads_of_a_script_have_one_token_in_every_process(tmp_path):
    """cloudpickle gives classes of __main__ a new id per process: a run using them could never resume."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0].split())) == 3


def test_another_body_closure_default_or_helper_is_another_token():
    def make(scale):
        def head(x):
            return x * scale
        return head

    def plain(x, k=1):
        return x * k

    def plain_other_default(x, k=2):
        return x * k

    assert stable_token(make(2)) == stable_token(make(2))
    assert stable_token(make(2)) != stable_token(make(3))  # what the closure holds counts
    assert stable_token(make(torch.zeros(3))) != stable_token(make(torch.ones(3)))
    assert stable_token(plain) != stable_token(plain_other_default)
    assert stable_token(functools.partial(plain, k=1)) != stable_token(functools.partial(plain, k=2))
    assert stable_token(torch.nn.Linear) == stable_token(torch.nn.Linear)


def _helper():
    return 1


def _uses_helper():
    return _helper()


def test_a_helper_of_the_same_module_that_changes_changes_the_token(monkeypatch):
    before = stable_token(_uses_helper)

    def _helper():  # noqa: F811 - another body under the same name
        return 2

    monkeypatch.setitem(_uses_helper.__globals__, "_helper", _helper)
    assert stable_token(_uses_helper) != before
