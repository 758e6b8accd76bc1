"""Credentials in URIs and URI-like strings are masked; everything else passes unchanged."""
import pytest

from dmdscale.redact import looks_secret, public_name, public_text, redact, redact_mapping, scrub


@pytest.mark.parametrize("text, expected", [
    ("http://user:pass@host:5000", "http://user:***@host:5000"),
    ("https://alice:s3cr%40t@mlflow.example.com/api", "https://alice:***@mlflow.example.com/api"),
    ("postgresql://user:pw@db/mlflow", "postgresql://user:***@db/mlflow"),
    ("mysql+pymysql://u:p@ss@db:3306/m", "mysql+pymysql://u:***@db:3306/m"),  # an unescaped '@' in the password
    ("https://ghp_abc123@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("s3://bucket/path?access_key=AK&secret_key=SK", "s3://bucket/path?access_key=***&secret_key=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=XYZ%3D", "https://acct.blob.core.windows.net/c?sv=2022&sig=***"),
    ("http://h/x?Token=abc&page=2", "http://h/x?Token=***&page=2"),
])
def test_credentials_in_uris_are_masked(text, expected):
    assert redact(text) == expected


def test_whole_messages_keep_their_words_and_punctuation():
    message = "could not reach http://u:p@h:5000/x?token=abc: refused"
    assert redact(message) == "could not reach http://u:***@h:5000/x?token=***: refused"
    two = "tried s3://b/c?secret_key=SK, then postgresql://me:pw@db/mlflow."
    assert redact(two) == "tried s3://b/c?secret_key=***, then postgresql://me:***@db/mlflow."


@pytest.mark.parametrize("text", [
    "",
    "plain text: step 12, loss 0.31 (user@example.com wrote it)",
    "gs://bucket/x",
    "s3://MY_BUCKET/dmdscale/run-1/checkpoint_000003",
    "http://127.0.0.1:5000",
    "sqlite:///mlflow.db",
    "file:///home/ray/runs/sdxl?mode=ro",
    "http://h/search?q=monkey&tokenizer=clip&page=2&design=a",
])
def test_text_without_credentials_is_untouched(text):
    assert redact(text) == text


def test_redaction_is_idempotent():
    once = redact("http://u:p@h/x?token=abc and https://tok@h")
    assert redact(once) == once


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("MLFLOW_TRACKING_PASSWORD", True), ("passwd", True), ("db_pass", True),
    ("client_secret", True), ("HF_TOKEN", True), ("access_token", True), ("key", True),
    ("api_key", True), ("AccessKey", True), ("X-Amz-Date", True), ("X-Goog-Signature", True),
    ("credentials", True), ("sig", True), ("Authorization", True),
    ("tokenizer", False), ("monkey", False), ("passage", False), ("design", False),
    ("scale.storage_path", False), ("author", False), ("AWS_ACCESS_KEY_ID", False),
])
def test_secret_names(name, secret):
    assert looks_secret(name) is secret


def test_redact_mapping_masks_values_and_secret_keys_without_touching_the_input():
    params = {
        "tracking_uri": "http://admin:hunter2@mlflow:5000",
        "scale.storage_path": "s3://bucket/run?secret_key=SK",
        "MLFLOW_TRACKING_TOKEN": "tok-123",
        "scale.num_workers": 16,
        "env": {"HF_TOKEN": "hf_x", "PATH": "/usr/bin"},
        "uris": ["https://t@h/x", "gs://bucket/x"],
    }
    before = repr(params)
    assert redact_mapping(params) == {
        "tracking_uri": "http://admin:***@mlflow:5000",
        "scale.storage_path": "s3://bucket/run?secret_key=***",
        "MLFLOW_TRACKING_TOKEN": "***",
        "scale.num_workers": 16,
        "env": {"HF_TOKEN": "***", "PATH": "/usr/bin"},
        "uris": ["https://***@h/x", "gs://bucket/x"],
    }
    assert repr(params) == before


# -- what is published (issue 37): credentials masked, local paths named by their own last part --

@pytest.mark.parametrize("text, expected", [
    ("/home/alice/data/train.parquet", "train.parquet"),
    ("~/runs/digits", "digits"),
    ("file:///home/alice/ckpt?secret_key=SK", "ckpt?secret_key=***"),
    ("sqlite:////home/alice/mlflow.db", "mlflow.db"),
    ("C:\\Users\\alice\\teacher", "teacher"),
    ('pipe = DiffusionPipeline.from_pretrained("/home/alice/teacher")', 'pipe = DiffusionPipeline.from_pretrained("teacher")'),
    ("distilled from /home/alice/teachers/t1.", "distilled from t1."),
    ('["/a/b", "/c/d"]', '["b", "d"]'),
    ("/home/alice/.cache/huggingface/hub/models--stabilityai--sdxl-turbo/snapshots/3f1a", "stabilityai/sdxl-turbo"),
    ("/root/.cache/huggingface/hub/models--gpt2/snapshots/3f1a/", "gpt2"),
])
def test_public_text_names_local_paths_by_their_own_name(text, expected):
    assert public_text(text) == expected


@pytest.mark.parametrize("text", [
    "s3://bucket/dmdscale/run-1", "gs://bucket/x", "https://arxiv.org/abs/2405.14867", "http://127.0.0.1:5000/x",
    "stabilityai/sdxl-turbo", "runs/digits", "x / 2 and 1/2", "/", "scheduler.set_timesteps(num_inference_steps=1)",
    "</w> <|endoftext|>",
])
def test_public_text_keeps_what_names_nothing_local(text):
    assert public_text(text) == text


def test_public_name_of_a_teacher(tmp_path):
    (tmp_path / "my-teacher").mkdir()
    assert public_name(tmp_path / "my-teacher") == "my-teacher"
    assert public_name(f"{tmp_path}/my-teacher/") == "my-teacher"
    assert public_name("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"  # a hub id
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "741f7c3"
    assert public_name(snapshot) == "black-forest-labs/FLUX.1-schnell"
    assert public_name("s3://bucket/teacher?X-Amz-Signature=ab") == "s3://bucket/teacher?X-Amz-Signature=***"


def test_scrub_is_the_one_path_for_the_run_folder_and_for_what_is_published():
    config = {"scale.storage_path": "s3://b/r?secret_key=SK", "data.path": "/home/alice/d/train.parquet",
              "model.teacher": "/home/alice/sdxl", "train.lr": 1e-5, "generator.timesteps": [999],
              "MLFLOW_TRACKING_TOKEN": "tok", "nested": {"uri": "http://u:pw@h/x", "dirs": ("/home/alice/a",)}}
    before = repr(config)
    assert scrub(config) == {**config, "scale.storage_path": "s3://b/r?secret_key=***", "MLFLOW_TRACKING_TOKEN": "***",
                             "nested": {"uri": "http://u:***@h/x", "dirs": ("/home/alice/a",)}}
    assert scrub(config) == redact_mapping(config)  # the run folder and the journal keep local paths
    assert scrub(config, public=True) == {
        "scale.storage_path": "s3://b/r?secret_key=***", "data.path": "train.parquet", "model.teacher": "sdxl",
        "train.lr": 1e-5, "generator.timesteps": [999], "MLFLOW_TRACKING_TOKEN": "***",
        "nested": {"uri": "http://u:***@h/x", "dirs": ("a",)}}
    assert repr(config) == before
    assert scrub("/home/alice/x?token=t", public=True) == "x?token=***"
