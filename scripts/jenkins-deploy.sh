#!/usr/bin/env bash
# Deploy the jobs and the view in jenkins/ to a Jenkins controller with Jenkins Job Builder.
#
#   scripts/jenkins-deploy.sh             upload (create or update) the six jobs and the view
#   scripts/jenkins-deploy.sh --test OUT  render the job XML into OUT offline; contacts nothing
#
# Environment (upload): JENKINS_URL, JENKINS_USER, JENKINS_API_TOKEN (the user's API token) and
# CT_TRIGGER_TOKEN (job2's "Trigger builds remotely" token; the controller holds the same value as
# the credential ct-trigger-token, see jenkins/casc.yaml). With --test, CT_TRIGGER_TOKEN may be unset
# (a placeholder is rendered). JJB: the jenkins-jobs program (default: .venv/bin/jenkins-jobs, else PATH).
#
# The token never touches the repository: it is written to a private temporary folder that is on
# JJB's include path (jobs.yaml reads it with !include-raw-verbatim) and removed on exit. The API
# token reaches JJB through its JJB_PASSWORD environment variable, not the command line.
set -euo pipefail

die() { echo "jenkins-deploy: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=update
out=
# The JJB definitions; jenkins/ also holds casc.yaml and docker-compose.yml, which are not JJB.
jobs=$repo/jenkins/jobs.yaml
case "${1:-}" in
  "") ;;
  --test)
    [[ -n "${2:-}" ]] || die "--test needs an output folder"
    mode="test"
    out=$2
    ;;
  -h | --help)
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument '$1' (try --help)" ;;
esac

jjb=${JJB:-}
if [[ -z "$jjb" ]]; then
  if [[ -x "$repo/.venv/bin/jenkins-jobs" ]]; then
    jjb=$repo/.venv/bin/jenkins-jobs
  else
    jjb=jenkins-jobs
  fi
fi
command -v "$jjb" >/dev/null || die "jenkins-jobs not found; run 'make venv' (jenkins/requirements.txt pins it)"

if [[ "$mode" == update ]]; then
  for var in JENKINS_URL JENKINS_USER JENKINS_API_TOKEN CT_TRIGGER_TOKEN; do
    [[ -n "${!var:-}" ]] || die "$var is not set (see README, 'Run it in Jenkins')"
  done
fi
token=${CT_TRIGGER_TOKEN:-render-only-placeholder}
[[ "$token" != *$'\n'* ]] || die "CT_TRIGGER_TOKEN must be one line"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 700 "$tmp"
printf '%s' "$token" >"$tmp/ct-trigger-token"
{
  echo "[job_builder]"
  echo "include_path=$tmp"
  echo "keep_descriptions=False"
  echo "[jenkins]"
  echo "url=${JENKINS_URL:-http://localhost:8080/}"
  echo "query_plugins_info=False"
} >"$tmp/jenkins_jobs.ini"

if [[ "$mode" == test ]]; then
  mkdir -p "$out"
  "$jjb" --conf "$tmp/jenkins_jobs.ini" -l warning test -o "$out" "$jobs"
  echo "jenkins-deploy: rendered $(find "$out" -maxdepth 1 -type f | wc -l) items into $out"
else
  JJB_USER=$JENKINS_USER JJB_PASSWORD=$JENKINS_API_TOKEN \
    "$jjb" --conf "$tmp/jenkins_jobs.ini" -l info update "$jobs"
  echo "jenkins-deploy: jobs and view updated on $JENKINS_URL"
fi
