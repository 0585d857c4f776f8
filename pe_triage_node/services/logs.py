"""Logging set-up for the node's processes (handlers are configured only here).

Log lines carry UIDs, job ids, AE titles and peer addresses, never patient
names, IDs, birth dates or accession numbers.
"""

from __future__ import annotations

import json
import logging
import sys

from pydicom import config as pydicom_config

from pe_triage_node.config import NodeConfig


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(cfg: NodeConfig, process_name: str) -> None:
    """Send the node's logs to stderr (journald under systemd) in text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.node.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {process_name}[%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.node.log_level)
    # pynetdicom logs dataset summaries at DEBUG (may include identifiers): keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns *and logs* a non-conforming value it reads, quoting the value ("Invalid value
    # for VR DA: '19XX0101'" is a birth date). The node checks what it uses where it uses it
    # (export/source.py, selection), so reading does not validate.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
