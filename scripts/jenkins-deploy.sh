#!/usr/bin/env bash
# Deploy the jobs and the view in jenkins/ to a Jenkins controller with Jenkins Job Builder.
#
#   scripts/jenkins-deploy.sh                       upload (create or update) the jobs and the view
#   scripts/jenkins-deploy.sh --test OUT [JOBS]     render the job XML into OUT offline (JOBS: another
#                                                   jobs.yaml, for the tests); contacts nothing
#
# Environment (upload): JENKINS_URL, JENKINS_ADMIN_TOKEN (an API token of the admin, who alone may
# create and configure jobs; JENKINS_ADMIN_ID, default admin, names the admin) and CT_REPO_URL (the
# repository job1 checks out), with CT_REPO_WEB_URL (its GitHub page; default: CT_REPO_URL without
# .git) and CT_BRANCH (default */main). With --test, unset ones get placeholders. JJB: the
# jenkins-jobs program (default: .venv/bin/jenkins-jobs, else PATH).
#
# What it writes is private (umask 077): the rendered XML (mode 600, in a folder of mode 700 when it
# makes OUT: umask 077) may hold a repository URL with credentials in it. No job holds a token: job2 has no
# build token (jenkins/jobs.yaml, job2).
#
# These values are rendered into the XML as literals, never as ${VARIABLES}: the GitHub plugin
# matches a push to job1 by its git URL expanded with job-level variables only, so a global one
# would stay literal there and the push would trigger nothing. They are written to a private
# temporary folder on JJB's include path (jobs.yaml reads them with !include-raw-verbatim, and job1's
# raw GitSCM XML with a Jinja2 include, XML-escaped) and
# removed on exit; the API token reaches JJB through its JJB_PASSWORD environment variable, not the
# command line.
#
# A local repository (a path or file://) is refused: it names a folder on a machine of the Jenkins
# set-up, not a remote (the git plugin aborts such checkouts in a controller workspace, SECURITY-2478,
# unless -Dhudson.plugins.git.GitSCM.ALLOW_LOCAL_CHECKOUT=true, which jenkins/docker-compose.yml sets
# when CT_ALLOW_LOCAL_CHECKOUT=true). For a test set-up, set CT_ALLOW_LOCAL_CHECKOUT=true here as well
# and mount the repository at the same path into the agent container, where job1 checks out, and
# the controller's, which polls.
set -euo pipefail

die() { echo "jenkins-deploy: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

jenkins_jobs_program() {
  local jjb=${JJB:-}
  if [[ -z "$jjb" ]]; then
    if [[ -x "$repo/.venv/bin/jenkins-jobs" ]]; then jjb=$repo/.venv/bin/jenkins-jobs; else jjb=jenkins-jobs; fi
  fi
  command -v "$jjb" >/dev/null || die "jenkins-jobs not found; run 'make venv' (jenkins/requirements.txt pins it)"
  printf '%s' "$jjb"
}

# Local as the git plugin sees it: file://..., or no scheme:// and not scp-like user@host:path.
is_local_repo() {
  [[ "$1" =~ ^[Ff][Ii][Ll][Ee]:// ]] && return 0
  [[ ! "$1" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// && ! "$1" =~ ^[^/]+@[^/]+: ]]
}

# write_includes DIR: the values jobs.yaml reads (!include-raw-verbatim; job1's URL and branch through
# a Jinja2 include, which would expand template syntax in them), one file each, checked.
write_includes() {
  local repo_url branch web_url var
  repo_url=${CT_REPO_URL:-https://github.com/OWNER/REPO.git}
  branch=${CT_BRANCH:-*/main}
  web_url=${CT_REPO_WEB_URL:-}
  if [[ -z "$web_url" ]]; then
    web_url=${repo_url%.git}
    # git@github.com:OWNER/REPO -> https://github.com/OWNER/REPO
    if [[ "$web_url" =~ ^[^@/]+@([^:/]+):(.+)$ ]]; then
      web_url="https://${BASH_REMATCH[1]}/${BASH_REMATCH[2]}"
    fi
  fi
  for var in repo_url branch web_url; do
    [[ "${!var}" != *$'\n'* && -n "${!var}" ]] || die "$var must be one non-empty line"
  done
  for var in repo_url branch; do
    [[ "${!var}" != *'{{'* && "${!var}" != *'{%'* && "${!var}" != *'{#'* ]] ||
      die "$var must not contain {{, {% or {# (job1's XML reads it as a Jinja2 template)"
  done
  if is_local_repo "$repo_url" && [[ "${CT_ALLOW_LOCAL_CHECKOUT:-false}" != true ]]; then
    die "CT_REPO_URL=$repo_url is a local repository, which the git plugin refuses to check out (SECURITY-2478): use an https:// or ssh URL, or set CT_ALLOW_LOCAL_CHECKOUT=true here and for docker-compose (docs/jenkins.md)"
  fi
  printf '%s' "$repo_url" >"$1/ct-repo-url"
  printf '%s' "$web_url" >"$1/ct-repo-web-url"
  printf '%s' "$branch" >"$1/ct-branch"
}

main() {
  local mode=update out="" jobs jjb var tmp
  # The JJB definitions; jenkins/ also holds casc.yaml and docker-compose.yml, which are not JJB.
  jobs=$repo/jenkins/jobs.yaml
  case "${1:-}" in
    "") ;;
    --test)
      [[ -n "${2:-}" ]] || die "--test needs an output folder"
      mode="test"
      out=$2
      jobs=${3:-$jobs}
      ;;
    -h | --help)
      sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      return 0
      ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  jjb=$(jenkins_jobs_program)
  if [[ "$mode" == update ]]; then
    for var in JENKINS_URL JENKINS_ADMIN_TOKEN CT_REPO_URL; do
      [[ -n "${!var:-}" ]] || die "$var is not set (see docs/jenkins.md)"
    done
  fi

  umask 077
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: tmp is local to main
  trap "rm -rf '$tmp'" EXIT
  chmod 700 "$tmp"
  write_includes "$tmp"
  {
    echo "[job_builder]"
    echo "include_path=$tmp"
    echo "keep_descriptions=False"
    echo "[jenkins]"
    echo "url=${JENKINS_URL:-http://localhost:8080/}"
    echo "query_plugins_info=False"
  } >"$tmp/jenkins_jobs.ini"

  if [[ "$mode" == test ]]; then
    # Rendered in the private folder, then moved: a file replaces (never writes through) what OUT
    # held under its name, and keeps its mode 600.
    mkdir "$tmp/render"
    "$jjb" --conf "$tmp/jenkins_jobs.ini" -l warning test -o "$tmp/render" "$jobs"
    mkdir -p -- "$out"
    mv -f -- "$tmp/render"/* "$out"/
    echo "jenkins-deploy: rendered $(find "$out" -maxdepth 1 -type f | wc -l) items into $out"
  else
    JJB_USER=${JENKINS_ADMIN_ID:-admin} JJB_PASSWORD=$JENKINS_ADMIN_TOKEN \
      "$jjb" --conf "$tmp/jenkins_jobs.ini" -l info update "$jobs"
    echo "jenkins-deploy: jobs and view updated on $JENKINS_URL"
  fi
}

main "$@"
