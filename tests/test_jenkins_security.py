"""Jenkins security as code: the controller runs no build (the handbook's "Controller Isolation"),
the agent that runs them has the Docker engine but none of the controller's secrets, a secret
reaches only the jobs that need it, through a masked credentials binding, the authorization is a
matrix in which ct-retrain may only start job2, job2 holds no build token, and what the deploy
script renders is private. No Jenkins server here: what Jenkins does with casc.yaml, the compose
file and the job XML is read from core's and the plugins' source at the pinned tags, cited in
each test."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ET

import yaml

from tests import test_jenkins_checks as jc
from tests.jenkins_render import JENKINS, JOBS, REPO, TOKEN
from tests.test_jenkins_controller import required_compose

CASC = JENKINS / "casc.yaml"
AGENT_DIR = "/var/ct-agent"  # the volume the controller writes the agent's arguments into
RETRAIN_USER = "ct-retrain"
BINDINGS = "org.jenkinsci.plugins.credentialsbinding.impl."
MATRIX = "hudson.security.AuthorizationMatrixProperty"

# What each job's script needs from the controller's secrets: job4 (after_run) and job7 (a failed
# deploy) mail from their scripts through ct.pipeline.notify; job5's mail is its email-ext
# publisher's, which runs on the controller; job6 retrains job2 as ct-retrain.
NEEDED = {"job4": {"SMTP_PASSWORD"}, "job7": {"SMTP_PASSWORD"},
          "job6": {"JENKINS_USER", "JENKINS_API_TOKEN"}}
# The controller's secrets (jenkins/docker-compose.yml), none of which the agent may hold.
CONTROLLER_SECRETS = {
    "JENKINS_ADMIN_PASSWORD": "adm-pw-0a1b", "JENKINS_RETRAIN_PASSWORD": "rt-pw-2c3d",
    "JENKINS_API_TOKEN": "api-tok-4e5f", "SMTP_PASSWORD": "smtp-pw-8c9d"}


def casc() -> dict:
    return yaml.safe_load(CASC.read_text())


def agents() -> list[dict]:
    return [node["permanent"] for node in casc()["jenkins"]["nodes"]]


# ----------------------------------------------------------------------- controller isolation


def test_the_built_in_node_runs_no_build_and_every_job_is_tied_to_the_agent(rendered):
    """Core jenkins-2.492.1: jenkins/model/Jenkins.java setNumExecutors(n) (casc's
    jenkins.numExecutors) updates the computer list, and hudson/model/Computer.java
    setNumExecutors creates exactly numExecutors Executor objects for a node, so the built-in
    node with 0 has none and can run no build (AbstractCIBase keeps its Computer only as a
    fallback). hudson/model/AbstractProject.java getAssignedLabel(): with canRoam false, the
    label parsed from assignedNode; a job runs only on a node carrying it."""
    jenkins = casc()["jenkins"]
    assert jenkins["numExecutors"] == 0 and jenkins["mode"] == "EXCLUSIVE"
    built_in_labels = set(str(jenkins.get("labelString", "")).split())
    agent_labels = {label for agent in agents() for label in agent["labelString"].split()}
    assert all(agent["numExecutors"] > 0 for agent in agents())
    for job in JOBS:
        root = rendered[job]
        assert root.findtext("canRoam") == "false", job
        label = root.findtext("assignedNode")
        assert label in agent_labels and label not in built_in_labels, job


def test_the_agent_connects_inbound_over_websocket_with_a_secret_on_no_command_line():
    """Core jenkins-2.492.1: hudson/slaves/DumbSlave.java @Symbol "permanent",
    hudson/slaves/JNLPLauncher.java @Symbol "inbound" with setWebSocket (what casc's README
    and demos/build_agents at 1963.v24e046127a_3f write); SlaveComputer.getJnlpMac() is
    JnlpAgentReceiver.SLAVE_SECRET.mac(name), what ct-agent-secret.groovy writes (core runs
    JENKINS_HOME/init.groovy.d/*.groovy, GroovyInitScript after JOB_CONFIG_ADAPTED; the image's
    jenkins.sh, jenkinsci/docker 2.492.1, copies ref/ there, *.override over the copy). Remoting
    3283.v92c105e0f819 (core's remoting.version) Launcher takes -url, -webSocket, -name,
    -secret; its args4j 2.33 CmdLineParser expands "@FILE" into the file's lines
    (expandAtFiles, atSyntax true by default), so the secret stays off the command line.
    jenkins.sh turns JENKINS_SLAVE_AGENT_PORT into -Djenkins.model.Jenkins.slaveAgentPort
    unless it is empty: empty, so casc's slaveAgentPort -1 (no TCP port) holds."""
    (agent,) = agents()
    assert agent["launcher"] == {"inbound": {"webSocket": True}}
    assert casc()["jenkins"]["slaveAgentPort"] == -1
    groovy = (JENKINS / "ct-agent-secret.groovy").read_text()
    assert re.search(r"^def name = '([^']+)'", groovy, re.M)[1] == agent["name"]
    assert "JnlpAgentReceiver.SLAVE_SECRET.mac(name)" in groovy
    assert f"Paths.get('{AGENT_DIR}')" in groovy and "'rw-------'" in groovy
    assert "['-name', name, '-secret', " in groovy and "ATOMIC_MOVE" in groovy
    script = (JENKINS / "agent.sh").read_text()
    (args_file,) = re.findall(r"^args=(\S+)$", script, re.M)
    written = re.search(r"dir\.resolve\('([^']+)'\)", groovy)[1]
    assert args_file == f"{AGENT_DIR}/{written}"
    (launch,) = re.findall(r"^exec java -jar .*?(?=\n\S|\Z)", script, re.M | re.S)
    assert '"@$args"' in launch and "-webSocket" in launch and "-secret" not in launch
    assert agent["remoteFS"] in launch
    dockerfile = (JENKINS / "Dockerfile").read_text()
    assert "ct-agent-secret.groovy /usr/share/jenkins/ref/init.groovy.d/" in dockerfile
    compose = yaml.safe_load((JENKINS / "docker-compose.yml").read_text())
    assert compose["services"]["jenkins"]["environment"]["JENKINS_SLAVE_AGENT_PORT"] == ""


def compose_config() -> dict:
    cmd = required_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "JENKINS_", "SMTP_"))}
    env.update(CONTROLLER_SECRETS)
    proc = subprocess.run([*cmd, "-f", str(JENKINS / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_the_agent_has_the_docker_engine_but_none_of_the_controllers_secrets():
    """Everything below is docker-compose's own rendering of the file, with each controller
    secret set in the environment to a value of its own."""
    services = compose_config()["services"]
    controller, agent = services["jenkins"], services["agent"]
    agent_env = {k: str(v) for k, v in (agent.get("environment") or {}).items()}
    assert not set(CONTROLLER_SECRETS) & set(agent_env)
    assert not [k for k, v in agent_env.items() if any(s in v for s in CONTROLLER_SECRETS.values())]
    assert not re.search(r"PASSWORD|TOKEN|SECRET", " ".join(agent_env))
    # the controller has them (casc.yaml reads them there) ...
    assert {k: controller["environment"][k] for k in CONTROLLER_SECRETS} == CONTROLLER_SECRETS

    def mounts(service: dict) -> dict[str, tuple[str, bool]]:
        """target -> (source, read-only), from compose's long or short volume syntax."""
        out = {}
        for v in service["volumes"]:
            if isinstance(v, str):
                source, target, *mode = v.split(":")
                out[target] = (source, mode == ["ro"])
            else:
                out[v["target"]] = (str(v["source"]), bool(v.get("read_only")))
        return out

    on_agent, on_controller = mounts(agent), mounts(controller)
    # ... the agent has the engine and the workspace, never JENKINS_HOME ...
    assert on_agent["/var/run/docker.sock"][0] == "/var/run/docker.sock"
    assert "/srv/ct-workspace" in on_agent and "/var/jenkins_home" not in on_agent
    assert on_agent[AGENT_DIR] == (on_controller[AGENT_DIR][0], True), "read-only for the agent"
    # ... and the controller neither: it runs no build
    assert "/var/run/docker.sock" not in on_controller and "/srv/ct-workspace" not in on_controller
    assert set(on_controller) == {"/var/jenkins_home", AGENT_DIR}
    assert "docker.io" not in (JENKINS / "Dockerfile").read_text()
    # Core jenkins-2.492.1 jenkins/security/s2m/CallableDirectionChecker.java refuses what an
    # agent sends the controller to run unless the system property ...CallableDirectionChecker
    # .allow is true: it is set nowhere.
    assert "CallableDirectionChecker" not in controller["environment"]["JENKINS_JAVA_OPTS"]
    assert "CallableDirectionChecker" not in (JENKINS / "Dockerfile").read_text()


# ------------------------------------------------------------------------------- bindings


def bound(root: ET.Element) -> dict[str, str]:
    """variable -> credential id, over the job's credentials-binding wrappers."""
    out = {}
    for wrapper in root.iter(BINDINGS + "SecretBuildWrapper"):
        for binding in wrapper.find("bindings"):
            cred = binding.findtext("credentialsId")
            for field in ("variable", "usernameVariable", "passwordVariable"):
                if binding.findtext(field):
                    out[binding.findtext(field)] = cred
    return out


def test_each_secret_reaches_only_the_jobs_whose_scripts_need_it(rendered):
    """A secret a job binds is in its script's environment, so a pusher's script gets it:
    exactly the ones a job needs, and none in any other job."""
    assert {job: set(bound(rendered[job])) for job in JOBS if bound(rendered[job])} == NEEDED
    # what job6's script refuses to retrain without is bound (scripts/job6-monitor.sh)
    script = (REPO / "scripts" / "job6-monitor.sh").read_text()
    body = re.search(r"^retrain_if_changed\(\) \{\n(.*?)^\}", script, re.M | re.S)[1]
    assert set(re.findall(r'-n "\$([A-Z_]+)"', body)) <= NEEDED["job6"]
    # each bound credential is defined in casc.yaml from the controller's environment
    defined = {}
    for entry in casc()["credentials"]["system"]["domainCredentials"][0]["credentials"]:
        ((_kind, cred),) = entry.items()
        defined[cred["id"]] = cred.get("secret") or cred.get("password")
    ids = {cred for job in JOBS for cred in bound(rendered[job]).values()}
    assert ids == set(defined)
    assert bound(rendered["job4"])["SMTP_PASSWORD"] == "ct-smtp-password"
    assert defined["ct-smtp-password"] == "${SMTP_PASSWORD:-}"


def test_a_bound_secret_is_masked_in_the_build_log(rendered):
    """credentials-binding 681.vf91669a_32e45: impl/SecretBuildWrapper.java setUp() collects
    every binding's secret values and decorateLogger() masks them (SecretPatterns
    getAggregateSecretPattern: each value, and its encoded forms, of 3 characters or more,
    replaced by ****); Binding.java reads the field `variable`, MultiBinding.java
    `credentialsId`, UsernamePasswordMultiBinding.java `usernameVariable`/`passwordVariable`
    (the password secret, the username public unless marked secret) - the names JJB 6.5.0's
    credentials-binding wrapper writes."""
    for job in NEEDED:
        (wrapper,) = rendered[job].find("buildWrappers").iter(BINDINGS + "SecretBuildWrapper")
        for binding in wrapper.find("bindings"):
            fields = {child.tag for child in binding}
            assert binding.tag in {BINDINGS + "StringBinding",
                                   BINDINGS + "UsernamePasswordMultiBinding"}, binding.tag
            assert fields in ({"variable", "credentialsId"},
                              {"usernameVariable", "passwordVariable", "credentialsId"}), fields


# -------------------------------------------------------------------------- authorization

# core jenkins-2.492.1: PermissionGroup ids are their English titles (hudson/model/
# Messages.properties Hudson.Permissions.Title=Overall, Item.Permissions.Title=Job) and a
# permission's id is its owner class name, ".", its name (hudson/security/Permission.java).
GROUP_OWNER = {"Overall": "hudson.model.Hudson", "Job": "hudson.model.Item"}


def permission_id(short: str) -> str:
    """matrix-auth matrix-auth-3.2.8 integrations/PermissionFinder.findPermissionId:
    "Title/Name" -> the group whose id is Title, then owner.getName() + "." + Name."""
    group, name = short.split("/", 1)
    return f"{GROUP_OWNER[group]}.{name}"


def test_authorization_is_a_matrix_where_ct_retrain_may_only_start_job2(rendered):
    """matrix-auth matrix-auth-3.2.8: integrations/casc/ProjectMatrixAuthorizationStrategy
    Configurator is "projectMatrix", with `entries` of DefinitionEntry: `user:` (type USER),
    `name` and `permissions` ("Overall/Administer" form, PermissionDefinition ->
    AuthorizationContainer.parsePermission). A job's hudson.security.AuthorizationMatrixProperty
    is read by AbstractAuthorizationPropertyConverter: inheritanceStrategy, then one
    <permission>TYPE:id:sid</permission> each (AuthorizationContainer.add), which is what JJB
    writes for a "USER:name" key. Nobody else has an entry, anonymous included: no permission."""
    strategy = casc()["jenkins"]["authorizationStrategy"]
    assert list(strategy) == ["projectMatrix"]
    entries = strategy["projectMatrix"]["entries"]
    assert all(list(e) == ["user"] for e in entries), "users by type, never an ambiguous sid"
    granted = {e["user"]["name"]: {permission_id(p) for p in e["user"]["permissions"]}
               for e in entries}
    users = [u["id"] for u in casc()["jenkins"]["securityRealm"]["local"]["users"]]
    assert set(granted) == set(users) and RETRAIN_USER in users
    (admin,) = set(users) - {RETRAIN_USER}
    assert granted[admin] == {"hudson.model.Hudson.Administer"}
    assert granted[RETRAIN_USER] == {"hudson.model.Hudson.Read"}
    matrices = {job: rendered[job].find(f"properties/{MATRIX}") for job in JOBS}
    assert [job for job, m in matrices.items() if m is not None] == ["job2"]
    job2 = matrices["job2"]
    assert job2.find("inheritanceStrategy").get("class") == \
        "org.jenkinsci.plugins.matrixauth.inheritance.InheritParentStrategy"
    assert {p.text for p in job2.iter("permission")} == {
        f"USER:hudson.model.Item.Read:{RETRAIN_USER}",
        f"USER:hudson.model.Item.Build:{RETRAIN_USER}"}
    # job6 logs in as that user
    (api,) = [e["usernamePassword"] for e in
              casc()["credentials"]["system"]["domainCredentials"][0]["credentials"]
              if "usernamePassword" in e and e["usernamePassword"]["id"] == "ct-jenkins-api"]
    assert api["username"] == RETRAIN_USER
    assert bound(rendered["job6"])["JENKINS_API_TOKEN"] == "ct-jenkins-api"


def test_matrix_auth_is_pinned_at_the_version_read():
    pins, _ = jc.read_plugins()
    assert pins["matrix-auth"] == "3.2.8"


def test_job2_holds_no_build_token(rendered, tmp_path):
    """Core jenkins-2.492.1: a job's authToken is saved as plain text in its config.xml
    (hudson/model/BuildAuthorizationToken.java ConverterImpl.toString). It is not needed:
    ParameterizedJobMixIn.doBuildWithParameters calls BuildAuthorizationToken.checkPermission,
    which with no token configured checks Item.BUILD (job2's matrix gives ct-retrain that) and
    requires POST, ignoring a token= the request carries; a POST authenticated by an API token is
    exempt from the CSRF crumb (jenkins/security/ApiCrumbExclusion.java, the attribute that
    BasicHeaderApiTokenAuthenticator sets)."""
    assert all(rendered[job].find("authToken") is None for job in JOBS)
    assert "auth-token" not in jc.JOBS_YAML.read_text()
    # the admin's API token in the deploying shell ends up in no rendered file
    xml = jc.render(jc.JOBS_YAML, tmp_path / "out", "deploy-env-token-5d6e")
    assert xml and not [p for p in (tmp_path / "out").iterdir()
                        if "deploy-env-token-5d6e" in p.read_text()]


# ------------------------------------------------------------------------- deploy output


def test_what_the_deploy_script_renders_is_private_and_never_written_through_a_link(tmp_path):
    """A repository URL may carry credentials; what --test writes is the owner's alone, and a
    name already in OUT (a link to a file outside) is replaced, not written through."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "fresh" / "out"
    url = "https://ci-bot:repo-pw-7f8e@github.com/example-org/cifar-ct.git"
    jc.render(jc.JOBS_YAML, out, TOKEN, {"CT_REPO_URL": url,
                                         "CT_REPO_WEB_URL": "https://github.com/example-org/x"})
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    assert "repo-pw-7f8e" in (out / "job1").read_text()
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    # an existing, world-readable OUT: its files come back private, its links are replaced
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "job2").write_text("old")
    (shared / "job2").chmod(0o644)
    (shared / "job1").symlink_to(outside)
    jc.render(jc.JOBS_YAML, shared, TOKEN, {"CT_REPO_URL": url})
    assert outside.read_text() == "keep me\n"
    assert not (shared / "job1").is_symlink()
    assert {stat.S_IMODE(p.lstat().st_mode) for p in shared.iterdir()} == {0o600}
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755, "a folder it did not make is left as is"
