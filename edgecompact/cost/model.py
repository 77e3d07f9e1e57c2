"""The latency model of one search, decided in one place: the target's measured table for this search space, else
its roofline estimate, labelled as such (also when a measured table does not cover the model's layer shapes).

The pipeline builds one `LatencyModel` per search and hands it to the budget and the methods; nothing here
measures or fills tables (edgecompact.profiling does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgecompact.cost.latency import LatencyTable, default_table_path
from edgecompact.cost.roofline import roofline_table
from edgecompact.errors import ConfigError
from edgecompact.structure import Structure
from edgecompact.targets import Target


@dataclass(frozen=True)
class LatencyModel:
    """Predicted ms of an architecture (`model(widths)`), from one table; `label` names the table's source."""

    table: LatencyTable
    structure: Structure

    def __call__(self, widths: dict[str, int]) -> float:
        return self.table.predict(self.structure, widths)

    @property
    def label(self) -> str:
        return self.table.label


def latency_model(structure: Structure, target: Target, profile: Path | None = None, *,
                  build: Callable[[Structure, Target, Path], LatencyTable] | None = None,
                  log: Callable[[str], None] = print) -> LatencyModel:
    """The search's latency model: `profile` if given (it must cover the model), else `table_for`, falling back to
    the roofline estimate when the measured table does not cover this model's layer shapes.

    build (edgecompact.profiling.profile): given by a search that needs measured milliseconds (a latency budget, a
    latency-weighted method); on a target that runs here with no table for this CPU, model and channel multiple,
    it profiles one on first use, with progress, into this CPU's cache folder (`latency.host_profiles_dir`);
    later searches reuse it."""
    if profile:
        table = LatencyTable.load(Path(profile), target)
    else:
        table = table_for(target, structure)
        if table.is_estimate and build is not None and target.runnable_here:
            path = default_table_path(target, structure.model_name)
            log(f"no {target.name} latency table for this CPU, {structure.model_name} and channel "
                f"multiple {target.channel_multiple}: profiling one into {path} (once per machine)")
            table = build(structure, target, path)
    try:
        table.predict(structure, structure.baseline_widths())
    except ConfigError:
        if profile:
            raise
        table = roofline_table(structure, target)
    return LatencyModel(table, structure)


def table_for(target: Target, structure: Structure, space: str | None = None, directory: Path | None = None
              ) -> LatencyTable:
    """The measured table of `target` for this search space if one exists, else the roofline estimate.

    The default place is this CPU's cache folder for a target that runs here, else the repository's profiles/
    (`latency.default_table_path`). The estimate's provenance says `roofline-estimate` and `label` says so:
    callers print the label. A table measured with another runtime than the one the target ships, or on another
    CPU, is refused (ConfigError), never used.
    """
    path = default_table_path(target, space or structure.model_name, directory)
    if path.is_file():
        table = LatencyTable.load(path, target)
        if not table.is_estimate and table.runtime != target.runtime:
            raise ConfigError(
                f"{path}: measured with {table.runtime}, but target '{target.name}' ships {target.runtime}; "
                f"re-profile it (`edgecompact profile --target {target.name}`)"
            )
        return table
    return roofline_table(structure, target)
