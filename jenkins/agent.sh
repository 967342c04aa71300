#!/usr/bin/env bash
# The build agent's start (Dockerfile.agent): connect to the controller at $CT_AGENT_CONTROLLER_URL
# over WebSocket as the permanent agent of casc.yaml. The agent's name and connection secret come
# from the argument file that the controller's ct-agent-secret.groovy writes (mode 600) into the
# volume both share; remoting reads it as "@FILE" (args4j's argument files), so the secret is never
# on a command line, where every user of the host could read it.
set -euo pipefail

args=/var/ct-agent/agent.args
: "${CT_AGENT_CONTROLLER_URL:?set CT_AGENT_CONTROLLER_URL to the URL of the controller}"

# The controller writes the file once its jobs are loaded; compose starts both at once.
until [[ -f "$args" && -r "$args" ]]; do
  echo "ct-agent: waiting for the controller to write $args" >&2
  sleep 5
done
exec java -jar /usr/share/jenkins/agent.jar -url "$CT_AGENT_CONTROLLER_URL" -webSocket \
  -workDir /var/jenkins_home/agent "@$args"
