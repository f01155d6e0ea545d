"""read_json_object: the one reader of config.json / manifest.json / adapter_config.json."""

from __future__ import annotations

import pytest

from octopus_rt.errors import BundleError, InputError
from octopus_rt.jsonfile import read_json_object


def test_reads_an_object(tmp_path):
    (tmp_path / "c.json").write_text('{"a": [1, 2], "b": "\\u00e9"}', encoding="utf-8")
    assert read_json_object(tmp_path / "c.json") == {"a": [1, 2], "b": "é"}


@pytest.mark.parametrize("content, reason", [
    (b"{", "cannot read"),
    (b"\xff\xfe{}", "cannot read"),
    (b"[1, 2]", "does not hold a JSON object"),
    (b"null", "does not hold a JSON object"),
])
def test_bad_content_is_one_line_of_the_callers_error(tmp_path, content, reason):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(BundleError) as info:
        read_json_object(path, BundleError)
    assert reason in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no config here"):
        read_json_object(tmp_path / "absent.json", missing="no config here")
    with pytest.raises(InputError, match="cannot read"):
        read_json_object(tmp_path / "absent.json")
    with pytest.raises(InputError, match="cannot read"):
        read_json_object(tmp_path)  # a directory is not a file
