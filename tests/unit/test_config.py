from pathlib import Path

import pytest

from moorage import config


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_when_no_files(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path / "m.toml", ""), tmp_path)
    assert cfg.api.listen == Path("/run/moorage/moorage.sock")
    assert cfg.root == Path("/var/lib/moorage")
    assert cfg.runroot == Path("/run/moorage")
    assert cfg.api.socket_mode == 0o660
    assert cfg.api.grpc_max_recv_msg_size >= 16 * 1024 * 1024
    assert cfg.runtime.cgroup_manager == "cgroupfs"


def test_drop_ins_in_lexical_order_last_wins_and_flags_override(tmp_path: Path) -> None:
    main = _write(tmp_path / "m.toml",
                  'log_level = "debug"\n[image]\nmax_concurrent_downloads = 2\n')
    d = tmp_path / "m.d"
    _write(d / "20-b.toml", "[image]\nmax_concurrent_downloads = 5\n")
    _write(d / "10-a.toml", "[image]\nmax_concurrent_downloads = 4\npull_progress_timeout = 7\n")
    _write(d / "ignored.conf", "this is not toml [")
    cfg = config.load(main, d, {"log_level": "error", "root": None})
    assert cfg.image.max_concurrent_downloads == 5
    assert cfg.image.pull_progress_timeout == 7
    assert cfg.log_level == "error"
    assert cfg.root == Path("/var/lib/moorage")


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    main = _write(tmp_path / "m.toml", "[image]\nmax_concurent_downloads = 2\n")
    with pytest.raises(config.ConfigError, match="unknown key 'image.max_concurent_downloads'"):
        config.load(main, tmp_path)


def test_bad_value_names_the_key_and_file(tmp_path: Path) -> None:
    main = _write(tmp_path / "m.toml", 'log_format = "xml"\n')
    with pytest.raises(config.ConfigError, match="log_format") as e:
        config.load(main, tmp_path)
    assert str(main) in str(e.value)


def test_relative_root_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="'root'"):
        config.load(_write(tmp_path / "m.toml", ""), tmp_path, {"root": Path("rel")})


def test_cdi_spec_dirs(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path / "m.toml", '[cdi]\nspec_dirs = ["/a", "/b"]\n'), tmp_path)
    assert cfg.cdi.spec_dirs == [Path("/a"), Path("/b")]
    with pytest.raises(config.ConfigError,
                       match=r"'cdi\.spec_dirs\.0': must be an absolute path \(got 'cdi'\)"):
        config.load(_write(tmp_path / "m.toml", '[cdi]\nspec_dirs = ["cdi"]\n'), tmp_path)


def test_bad_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path / "m.toml", "a = ["), tmp_path)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml", tmp_path)


def test_render_round_trips(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path / "m.toml", "[api]\nsocket_mode = 0o600\n"), tmp_path,
                      {"listen": tmp_path / "s.sock"})
    text = config.render(cfg)
    assert "# Unix socket the CRI gRPC server listens on" in text
    assert "socket_mode = 0o600" in text
    again = config.load(_write(tmp_path / "r.toml", text), tmp_path)
    assert again == cfg


def test_runtime_handlers_add_to_runc_and_default_must_exist(tmp_path: Path) -> None:
    main = _write(tmp_path / "m.toml", '[runtimes.crun]\nruntime_path = "/usr/bin/crun"\n')
    cfg = config.load(main, tmp_path)
    assert set(cfg.runtimes) == {"runc", "crun"}
    assert cfg.runtime_root("crun") == Path("/run/moorage/runtimes/crun")
    with pytest.raises(config.ConfigError, match="'kata' is not a configured runtime handler"):
        config.load(main, tmp_path, {"default_runtime": "kata"})
