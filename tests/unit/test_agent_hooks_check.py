"""What a host checks of its hooks after the commit before it acks ready (``_check_runnable``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from watcher.agent import _after_the_flip, _check_runnable
from watcher.config import AppConfig
from watcher.errors import HookError
from watcher.releases import AppLayout

OLD, NEW = "20261205T070000Z-main-0000000a", "20261205T071000Z-main-0000000b"


@pytest.fixture
def layout(tmp_path: Path) -> AppLayout:
    lay = AppLayout(tmp_path / "web")
    for release in (OLD, NEW):
        (lay.release_dir(release) / "bin").mkdir(parents=True)
    lay.current.symlink_to(lay.link_target(OLD))
    return lay


def reload_in(layout: AppLayout, release: str) -> Path:
    hook = layout.release_dir(release) / "bin" / "reload"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    return hook


def app_with(layout: AppLayout, phase: str) -> AppConfig:
    """The app, with ``phase`` running ``current/bin/reload`` (as a config names it)."""
    app = AppConfig(name="web", root=str(layout.app_dir.parent))
    return dataclasses.replace(app, hooks={phase: ((str(layout.current / "bin" / "reload"),),)})


class TestAfterTheFlip:
    def test_a_path_under_current_is_looked_for_in_the_new_release(self, layout: AppLayout) -> None:
        path = layout.current / "bin" / "reload"
        assert _after_the_flip(path, layout, layout.release_dir(NEW)) == (
            layout.release_dir(NEW) / "bin" / "reload"
        )

    def test_so_is_one_through_another_symlink_into_current(
        self, layout: AppLayout, tmp_path: Path
    ) -> None:
        (tmp_path / "www").symlink_to(layout.current)
        path = tmp_path / "www" / "bin" / "reload"
        assert _after_the_flip(path, layout, layout.release_dir(NEW)) == (
            layout.release_dir(NEW) / "bin" / "reload"
        )

    def test_any_other_path_is_itself(self, layout: AppLayout, tmp_path: Path) -> None:
        path = tmp_path / "hooks" / "reload"
        assert _after_the_flip(path, layout, layout.release_dir(NEW)) == path


class TestCheckRunnable:
    def test_a_hook_the_new_release_brings_is_fine(self, layout: AppLayout) -> None:
        """The config names current/bin/reload; only the new release has it."""
        reload_in(layout, NEW)
        _check_runnable(app_with(layout, "post_symlink"), layout, NEW)

    def test_one_it_lacks_is_named(self, layout: AppLayout) -> None:
        reload_in(layout, OLD)
        with pytest.raises(HookError, match="does not exist: it would fail after the commit"):
            _check_runnable(app_with(layout, "validate"), layout, NEW)
