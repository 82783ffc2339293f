"""Start and stop the real Redis and Kafka that the stack and its tests use, and on request PostgreSQL with an
MLflow tracking server on it.

Redis is Debian's ``redis-server``; Kafka is the Apache broker in KRaft mode (one node, broker+controller)
run from the Maven Central jars, resolved once into a cache folder. ``--with mlflow`` adds Debian's
PostgreSQL (its own cluster in ``<run-dir>/postgres``, run as the unprivileged ``postgres`` user when we are
root, since PostgreSQL refuses root) and ``mlflow server`` on it, the registry many hosts share; their
address goes to the env file as ``MLOPS_MLFLOW_URI``. All listen on free loopback ports;
their addresses go to one env file (``<run-dir>/services.env``) that :class:`mlops.settings.Settings`
reads. Process ids live in ``<run-dir>/services.json`` so that ``down`` (or the next ``up``) never leaves a
stray process behind. A service restarted with ``up --only kafka`` keeps its port and data, which is what
the broker-outage tests rely on.

``up --secure`` starts the same services with TLS and passwords everywhere (see :func:`up`).

    python -m tools.services up|down|status [--only redis|kafka|postgres|mlflow] [--with mlflow] [--secure]
                                            [--run-dir .run]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlops.connections import kafka_config, redis_options
from mlops.settings import ENV_PREFIX, Settings
from tools import certs

ROOT = Path(__file__).resolve().parents[1]
KAFKA_POM = ROOT / "scripts" / "kafka" / "pom.xml"
KAFKA_VERSION = "4.1.1"
DEFAULT_RUN_DIR = Path(".run")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlops-stack"
SERVICES = ("redis", "kafka")
# Started only when asked for (`up --with mlflow`): the default test session and demo do not need them.
OPTIONAL = ("postgres", "mlflow")
REQUIRES = {"mlflow": ("postgres",)}
PG_DATABASE = "mlflow"
PG_USER = "mlflow"
# The account every part of the stack uses on the secured services (`up --secure`); Kafka's broker has its own.
SECURE_USER = "mlops"
MLFLOW_ADMIN = "admin"
# Topics the stack uses, with their partition counts (more partitions let drift consumers scale out).
TOPICS = {"predictions": 3, "drift-alerts": 1, "predictions-dlq": 1, "prediction-outcomes": 3}


class ServiceError(RuntimeError):
    """A service could not be installed, started or reached."""


@dataclass
class RunDir:
    path: Path

    @property
    def state_file(self) -> Path:
        return self.path / "services.json"

    @property
    def env_file(self) -> Path:
        return self.path / "services.env"

    def load(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def save(self, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))
        sec = self.security(state)
        lines = []
        if "redis" in state:
            lines.append(f"MLOPS_REDIS_ADDRESS=127.0.0.1:{state['redis']['port']}")
            if sec:
                lines += [f"{key}={value}" for key, value in sec.redis_env().items()]
        if "kafka" in state:
            lines.append(f"MLOPS_KAFKA_BOOTSTRAP=127.0.0.1:{state['kafka']['port']}")
            if sec:
                lines += [f"{key}={value}" for key, value in sec.kafka_env().items()]
        if "postgres" in state:
            lines.append(f"MLOPS_POSTGRES_ADDRESS=127.0.0.1:{state['postgres']['port']}")
            if sec:
                lines.append(f"MLOPS_MLFLOW_DB_PASSWORD_FILE={sec.file('postgres')}")
        if "mlflow" in state:
            lines.append(f"MLOPS_MLFLOW_URI=http://127.0.0.1:{state['mlflow']['port']}")
            if sec:
                lines += [f"MLOPS_MLFLOW_USERNAME={MLFLOW_ADMIN}", f"MLOPS_MLFLOW_PASSWORD_FILE={sec.file('mlflow')}"]
        self.env_file.write_text("\n".join(lines) + "\n")

    def security(self, state: dict) -> Security | None:
        """The credentials and TLS files of a run folder started with ``up --secure``."""
        return Security(self.path / "secrets") if state.get("secure") else None


@dataclass(frozen=True)
class Security:
    """Passwords (one file each, owner-only) and TLS files of the secured services. Made once per run folder:
    a restart keeps them, so clients holding the files keep connecting."""

    folder: Path
    NAMES = ("redis", "kafka", "kafka-broker", "postgres", "mlflow")

    @property
    def tls(self) -> certs.TlsFiles:
        return certs.TlsFiles(self.folder.resolve() / "tls")

    def file(self, name: str) -> Path:
        return (self.folder / f"{name}-password").resolve()

    def password(self, name: str) -> str:
        return self.file(name).read_text().strip()

    @classmethod
    def make(cls, folder: Path) -> Security:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        sec = cls(folder)
        for name in cls.NAMES:
            path = sec.file(name)
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(24) + "\n")
        certs.make(folder / "tls")
        return sec

    def redis_env(self) -> dict[str, str]:
        """The settings (as the env file writes them) by which the stack reaches the secured Redis."""
        return {"MLOPS_REDIS_TLS": "true", "MLOPS_REDIS_CA_FILE": str(self.tls.ca),
                "MLOPS_REDIS_USERNAME": SECURE_USER, "MLOPS_REDIS_PASSWORD_FILE": str(self.file("redis"))}

    def kafka_env(self) -> dict[str, str]:
        """The same for the secured Kafka broker."""
        return {"MLOPS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MLOPS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "MLOPS_KAFKA_SASL_USERNAME": SECURE_USER, "MLOPS_KAFKA_SASL_PASSWORD_FILE": str(self.file("kafka")),
                "MLOPS_KAFKA_SSL_CA_FILE": str(self.tls.ca)}

    def client_settings(self, **addresses: str) -> Settings:
        """Settings as a client of the secured services holds them (``redis_address=…``, ``kafka_bootstrap=…``):
        the start-up checks connect through ``mlops.connections``, the same code as the stack."""
        env = {**self.redis_env(), **self.kafka_env()}
        return Settings(**{key.removeprefix(ENV_PREFIX).lower(): value for key, value in env.items()}, **addresses)


def ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port() -> int:
    """A free loopback port *outside* the ephemeral range: a port picked by the kernel (bind to 0) comes from
    that range, where any outgoing connection may take it meanwhile, so a service could not restart on its
    recorded port. Outside it, only a listener can hold the port."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in range(10_000, 65_536) if p not in ephemeral]
    rng = random.Random()
    for port in rng.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free outside the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and its command line names ``marker`` (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def stop_process(pid: int, marker: str, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
    if not process_alive(pid, marker):
        return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid, marker):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_checked(cmd: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ServiceError(f"{what} failed ({result.returncode}): {' | '.join(tail)}")


# --- Redis -------------------------------------------------------------------------------------------


def ensure_redis_installed() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    if os.geteuid() != 0:
        raise ServiceError("redis-server is missing; install it with: sudo apt-get install -y redis-server")
    run_checked(["apt-get", "update", "-qq"], "apt-get update")
    run_checked(["apt-get", "install", "-y", "-qq", "redis-server"], "apt-get install redis-server",
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    exe = shutil.which("redis-server")
    if not exe:
        raise ServiceError("redis-server still missing after apt-get install")
    return exe


def start_redis(run: RunDir, port: int, sec: Security | None = None) -> int:
    exe = ensure_redis_installed()
    data = run.path / "redis"
    data.mkdir(parents=True, exist_ok=True)
    log = open(run.path / "redis.log", "ab")
    listen = ["--port", str(port)]
    config: list[str] = []
    if sec is not None:
        # TLS only (no plaintext port); the default user is off and the stack's ACL user has a password, kept in
        # the config file as its SHA-256 (Redis's own hashed form), so no process list or file shows it.
        digest = hashlib.sha256(sec.password("redis").encode()).hexdigest()
        conf = data / "secure.conf"
        conf.write_text(f"user default off\nuser {SECURE_USER} on #{digest} ~* &* +@all\n")
        conf.chmod(0o600)
        config = [str(conf.resolve())]
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(sec.tls.server_cert),
                  "--tls-key-file", str(sec.tls.server_key), "--tls-ca-cert-file", str(sec.tls.ca),
                  "--tls-auth-clients", "optional"]
    proc = subprocess.Popen(
        [exe, *config, *listen, "--bind", "127.0.0.1", "--dir", str(data.resolve()),
         # The online store survives a restart, as a production Redis would: append-only file, fsync each second.
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
         "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_until(lambda: redis_ping(port, sec), 20, f"redis on port {port}", proc)
    return proc.pid


def redis_ping(port: int, sec: Security | None = None) -> bool:
    import redis

    address = f"127.0.0.1:{port}"
    options = redis_options(sec.client_settings(redis_address=address)) if sec else {"host": "127.0.0.1",
                                                                                     "port": port}
    try:
        return bool(redis.Redis(**options, socket_timeout=1).ping())
    except redis.RedisError:
        return False


# --- Kafka -------------------------------------------------------------------------------------------


def kafka_lib(cache: Path = DEFAULT_CACHE) -> Path:
    """The broker's jars, resolved with Maven on first use and cached afterwards."""
    lib = cache / f"kafka-{KAFKA_VERSION}" / "lib"
    if (lib / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        return lib
    if not shutil.which("mvn") or not shutil.which("java"):
        raise ServiceError("java and mvn are needed to fetch the Kafka broker jars (apt-get install maven)")
    tmp = lib.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    run_checked(["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
                 f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}"],
                "mvn dependency:copy-dependencies (Kafka jars)")
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    return lib


def _pem_value(path: Path) -> str:
    """A PEM file as one properties value (Java's Properties reads ``\\n`` as a line break)."""
    return path.read_text().strip().replace("\n", "\\n")


def secure_listener(port: int, sec: Security) -> dict[str, str]:
    """SASL_SSL for clients and between brokers: SCRAM-SHA-512 over TLS with the PEM files made at start-up.
    The controller listener (KRaft's quorum, no client API) stays on loopback."""
    jaas = (f'org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" '
            f'password="{sec.password("kafka-broker")}";')
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{{controller_port}}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.certificate.chain": _pem_value(sec.tls.server_cert),
        "ssl.keystore.key": _pem_value(sec.tls.server_key),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.certificates": _pem_value(sec.tls.ca),
        "ssl.client.auth": "none",
    }


def kafka_properties(run: RunDir, port: int, controller_port: int, sec: Security | None = None) -> Path:
    data = (run.path / "kafka" / "data").resolve()
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data),
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.partitions": "3",
        "auto.create.topics.enable": "true",
        "log.retention.hours": "168",
    }
    if sec is not None:
        props.update({k: v.replace("{controller_port}", str(controller_port))
                      for k, v in secure_listener(port, sec).items()})
    path = run.path / "kafka" / "server.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the broker's key and password
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def new_cluster_id() -> str:
    """A random cluster id (URL-safe base64 of a UUID, as Kafka's own) that never starts with ``-``: the
    storage tool would read such an id as an option (1 start in 64 failed that way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if cluster_id[0].isalnum():
            return cluster_id


def start_kafka(run: RunDir, port: int, controller_port: int, sec: Security | None = None) -> int:
    lib = kafka_lib()
    java = shutil.which("java")
    assert java
    props = kafka_properties(run, port, controller_port, sec)
    classpath = f"{lib}/*"
    if not (run.path / "kafka" / "data" / "meta.properties").exists():
        cluster_id = new_cluster_id()
        # KRaft keeps SCRAM credentials in its metadata log: the broker's and the stack's users are written at
        # format time, so the first client can authenticate without an admin step.
        scram = [] if sec is None else [
            arg for user, name in (("broker", "kafka-broker"), (SECURE_USER, "kafka"))
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={sec.password(name)}]")]
        run_checked([java, "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                     "-c", str(props), *scram], "kafka storage format")
    log = open(run.path / "kafka.log", "ab")
    tmp = run.path / "kafka" / "tmp"  # lz4-java unpacks a native library per start: keep it in the run folder
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true", f"-Djava.io.tmpdir={tmp}",
         "-cp", classpath, "kafka.Kafka", str(props)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_until(lambda: kafka_ready(port, sec), 90, f"kafka on port {port}", proc)
    create_topics(f"127.0.0.1:{port}", sec=sec)
    return proc.pid


def kafka_client(bootstrap: str, sec: Security | None) -> dict:
    """A Kafka client's connection properties: plain, or the stack's own for the secured broker."""
    return kafka_config(sec.client_settings(kafka_bootstrap=bootstrap)) if sec else {"bootstrap.servers": bootstrap}


def kafka_ready(port: int, sec: Security | None = None) -> bool:
    if not port_open(port):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({**kafka_client(f"127.0.0.1:{port}", sec), "log_level": 2}).list_topics(timeout=3)
        return True
    except KafkaException:
        return False


def create_topics(bootstrap: str, topics: dict[str, int] = TOPICS, sec: Security | None = None) -> None:
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({**kafka_client(bootstrap, sec), "log_level": 2})
    existing = set(admin.list_topics(timeout=30).topics)
    new = [NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing]
    for name, future in (admin.create_topics(new, request_timeout=30) if new else {}).items():
        try:
            future.result(timeout=30)
        except Exception as exc:  # a topic another caller created meanwhile is fine
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise ServiceError(f"could not create topic {name}: {exc}") from exc


# --- PostgreSQL ---------------------------------------------------------------------------------------


def postgres_bin(tool: str) -> str:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin, off PATH; some images link them."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]),
                        reverse=True) if Path("/usr/lib/postgresql").exists() else []
    if candidates:
        return str(candidates[0])
    if os.geteuid() != 0:
        raise ServiceError("PostgreSQL is missing; install it with: sudo apt-get install -y postgresql")
    run_checked(["apt-get", "update", "-qq"], "apt-get update")
    run_checked(["apt-get", "install", "-y", "-qq", "postgresql"], "apt-get install postgresql",
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return postgres_bin(tool)


def postgres_user() -> str | None:
    """The account PostgreSQL runs as: ourselves, or when we are root (which it refuses) Debian's ``postgres``."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServiceError("running as root, and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


def _let_through(path: Path) -> None:
    """Make every folder above ``path`` traversable (not listable) for the unprivileged server account:
    a test's run folder lives in a 0700 temporary folder."""
    for parent in reversed(path.resolve().parents):
        mode = parent.stat().st_mode
        if not mode & 0o001 and parent.stat().st_uid == os.geteuid():
            parent.chmod(mode | 0o001)


def start_postgres(run: RunDir, port: int, sec: Security | None = None) -> int:
    user = postgres_user()
    home = (run.path / "postgres").resolve()
    data = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    as_user: dict = {}
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        _let_through(home)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        auth = ["--auth=trust"]
        pwfile = home / "initdb-password"
        if sec is not None:  # SCRAM passwords for every connection; initdb reads the superuser's from a file
            pwfile.write_text(sec.password("postgres") + "\n")
            pwfile.chmod(0o600)
            if as_user:
                os.chown(pwfile, as_user["user"], as_user["group"])
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            run_checked([postgres_bin("initdb"), "-D", str(data), "-U", PG_USER, *auth, "-E", "UTF8",
                         "--locale=C"], "initdb", cwd=home, **as_user)
        finally:
            pwfile.unlink(missing_ok=True)
    log = open(run.path / "postgres.log", "ab")
    proc = subprocess.Popen(
        [postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
         "-c", "unix_socket_directories=", "-c", "max_connections=100", "-c", "fsync=on"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home, **as_user,
    )
    wait_until(lambda: postgres_ready(port, sec), 60, f"postgres on port {port}", proc)
    ensure_database(port, sec)
    return proc.pid


def _pg_connect(port: int, database: str = "postgres", sec: Security | None = None):
    import psycopg2

    password = {"password": sec.password("postgres")} if sec else {}
    return psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname=database, connect_timeout=2,
                            **password)


def postgres_ready(port: int, sec: Security | None = None) -> bool:
    if not port_open(port):
        return False
    import psycopg2

    try:
        _pg_connect(port, sec=sec).close()
        return True
    except psycopg2.Error:
        return False


def ensure_database(port: int, sec: Security | None = None) -> None:
    conn = _pg_connect(port, sec=sec)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{PG_DATABASE}"')
    finally:
        conn.close()


def postgres_uri(port: int) -> str:
    return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"


# --- MLflow tracking server ----------------------------------------------------------------------------


def secure_mlflow_env(run: RunDir, pg_port: int, sec: Security) -> tuple[list[str], dict[str, str]]:
    """MLflow's basic-auth app (users in a SQLite file of the run folder, the admin's password from the
    secrets) and the database password through a ``pgpass`` file, never on the command line."""
    home = (run.path / "mlflow-server").resolve()
    pgpass = sec.folder.resolve() / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_port}:{PG_DATABASE}:{PG_USER}:{sec.password('postgres')}\n")
    pgpass.chmod(0o600)
    ini = home / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{home / 'basic_auth.db'}\n"
                   f"admin_username = {MLFLOW_ADMIN}\nadmin_password = {sec.password('mlflow')}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # A verified password is remembered for 5 minutes: without it every request pays the PBKDF2
                   # check (0.4 s here), which made a promotion take seconds.
                   "auth_cache_ttl_seconds = 300\n")
    ini.chmod(0o600)
    return ["--app-name", "basic-auth"], {"PGPASSFILE": str(pgpass), "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                          "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


def start_mlflow(run: RunDir, port: int, pg_port: int, sec: Security | None = None) -> int:
    """``mlflow server`` on the PostgreSQL store; artifacts are proxied by the server into the run folder."""
    exe = Path(sys.executable).with_name("mlflow")
    artifacts = (run.path / "mlflow-server" / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = open(run.path / "mlflow-server.log", "ab")
    app, env = secure_mlflow_env(run, pg_port, sec) if sec else ([], {})
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", postgres_uri(pg_port), "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2", *app],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run.path,
        # No job runner: MLflow's huey job consumers (GenAI jobs, unused here) run in sessions of their own and
        # outlived `down`, leaving seven processes behind per server.
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env},
    )
    wait_until(lambda: mlflow_ready(port), 180, f"mlflow server on port {port}", proc)
    return proc.pid


def mlflow_ready(port: int) -> bool:
    if not port_open(port):
        return False
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- Orchestration -----------------------------------------------------------------------------------

MARKERS = {"redis": "redis-server", "kafka": "kafka.Kafka", "postgres": "postgres", "mlflow": "--backend-store-uri"}


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} during start (see its log)")
        if check():
            return
        time.sleep(0.3)
    if proc is not None:
        os.killpg(proc.pid, signal.SIGKILL)
    raise ServiceError(f"{what} did not become reachable within {timeout:.0f}s")


def is_running(state: dict, name: str) -> bool:
    entry = state.get(name)
    return bool(entry) and process_alive(entry["pid"], MARKERS[name])


def wanted(only: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """The services to act on, in start order (what a service requires comes before it)."""
    names = [only] if only else [*SERVICES, *extra]
    out: list[str] = []
    for name in names:
        for needed in (*REQUIRES.get(name, ()), name):
            if needed not in out:
                out.append(needed)
    return out


def up(run_dir: Path = DEFAULT_RUN_DIR, only: str | None = None, with_: tuple[str, ...] = (),
       secure: bool = False) -> dict:
    """Start what is not running yet (reusing recorded ports, so restarts keep their address).

    ``with_`` adds optional services (``("mlflow",)``: PostgreSQL and the MLflow server). ``secure``: Redis over
    TLS with an ACL user, Kafka on SASL_SSL (SCRAM-SHA-512), PostgreSQL with SCRAM passwords and MLflow with
    basic auth; passwords and certificates made in ``<run-dir>/secrets``, their paths in the env file. A run
    folder keeps the mode it was first started in (``down --purge`` forgets it). All or nothing: when one
    service fails to start, the ones this call started are stopped again.
    """
    run = RunDir(run_dir)
    state = run.load()
    if secure and not state.get("secure") and any(is_running(state, n) for n in (*SERVICES, *OPTIONAL)):
        raise ServiceError(f"services in {run_dir} run without --secure: `down --purge` them first")
    if secure or state.get("secure"):
        state["secure"] = True
    sec = run.security(state)
    if sec is not None:
        Security.make(sec.folder)
    started: list[str] = []
    try:
        for name in wanted(only, with_):
            if is_running(state, name):
                continue
            entry = state.get(name, {})
            port = entry.get("port") or free_port()
            if name == "redis":
                state[name] = {"port": port, "pid": start_redis(run, port, sec)}
            elif name == "kafka":
                cport = entry.get("controller_port") or free_port()
                state[name] = {"port": port, "controller_port": cport, "pid": start_kafka(run, port, cport, sec)}
            elif name == "postgres":
                state[name] = {"port": port, "pid": start_postgres(run, port, sec)}
            elif name == "mlflow":
                state[name] = {"port": port, "pid": start_mlflow(run, port, state["postgres"]["port"], sec)}
            started.append(name)
            run.save(state)
    except BaseException:
        for name in reversed(started):
            stop_process(state[name]["pid"], MARKERS[name])
            state[name]["pid"] = 0
        run.save(state)
        raise
    return state


def down(run_dir: Path = DEFAULT_RUN_DIR, only: str | None = None, purge: bool = False, kill: bool = False) -> None:
    """Stop the recorded processes (dependents first); ``purge`` also deletes their data (ports are forgotten);
    ``kill`` stops them with SIGKILL, as a crash would (what the fault tests use)."""
    run = RunDir(run_dir)
    state = run.load()
    names = [only] if only else [n for n in reversed(wanted(None, OPTIONAL)) if n in state]
    for name in names:
        entry = state.get(name)
        if entry:
            stop_process(entry["pid"], MARKERS[name], sig=signal.SIGKILL if kill else signal.SIGTERM)
            entry["pid"] = 0
    if purge:
        for name in names:
            state.pop(name, None)
            shutil.rmtree(run.path / name, ignore_errors=True)
            if name == "mlflow":
                shutil.rmtree(run.path / "mlflow-server", ignore_errors=True)
        if not any(n in state for n in (*SERVICES, *OPTIONAL)):  # nothing left: forget the mode and its secrets
            state.pop("secure", None)
            shutil.rmtree(run.path / "secrets", ignore_errors=True)
    run.save(state)


def status(run_dir: Path = DEFAULT_RUN_DIR) -> dict[str, dict]:
    state = RunDir(run_dir).load()
    return {
        name: {"running": is_running(state, name), "port": state.get(name, {}).get("port")}
        for name in (*SERVICES, *(n for n in OPTIONAL if n in state))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlops-services",
                                     description="Start/stop local Redis and Kafka (and PostgreSQL + MLflow server).")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--only", choices=(*SERVICES, *OPTIONAL))
    parser.add_argument("--with", dest="with_", action="append", choices=OPTIONAL, default=[],
                        help="with up: also start an optional service (mlflow: PostgreSQL + MLflow tracking server)")
    parser.add_argument("--secure", action="store_true",
                        help="with up: TLS and passwords on every service (made in <run-dir>/secrets)")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--purge", action="store_true", help="with down: delete data and forget ports")
    parser.add_argument("--kill", action="store_true", help="with down: SIGKILL, as a crash would")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(args.run_dir, args.only, tuple(args.with_), args.secure)
            print(f"services up; addresses in {RunDir(args.run_dir).env_file}")
            print(RunDir(args.run_dir).env_file.read_text().strip())
        elif args.action == "down":
            down(args.run_dir, args.only, args.purge, args.kill)
            print("services down")
        else:
            report = status(args.run_dir)
            for name, info in report.items():
                print(f"{name}: {'running' if info['running'] else 'stopped'} port={info['port']}")
            return 0 if all(i["running"] for i in report.values()) else 1
    except ServiceError as exc:
        print(f"mlops-services: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
