// Hands the build agent (jenkins/docker-compose.yml, service agent) what it connects with: its
// name and its inbound connection secret, as a remoting argument file (one argument a line) in the
// volume that only the controller and the agent mount. The secret is what core's SlaveComputer
// getJnlpMac() gives an inbound agent: JnlpAgentReceiver.SLAVE_SECRET.mac(name) (jenkins-2.492.1),
// which depends on the controller's secret key and the name only, so it can be written before the
// agent connects. Written atomically, mode 600, by the controller's user (uid 1000, as the agent's).
// Run by core at every start (JENKINS_HOME/init.groovy.d, after the jobs are loaded).
import java.nio.file.Files
import java.nio.file.Paths
import java.nio.file.StandardCopyOption
import java.nio.file.attribute.PosixFilePermissions
import jenkins.slaves.JnlpAgentReceiver

def name = 'ct-agent'  // casc.yaml's permanent agent
def dir = Paths.get('/var/ct-agent')
def tmp = Files.createTempFile(dir, '.agent.args', '',
        PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString('rw-------')))
Files.write(tmp, ['-name', name, '-secret', JnlpAgentReceiver.SLAVE_SECRET.mac(name)])
Files.move(tmp, dir.resolve('agent.args'), StandardCopyOption.ATOMIC_MOVE,
        StandardCopyOption.REPLACE_EXISTING)
