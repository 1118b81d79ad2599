package integration

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
	"github.com/batonhq/baton/worker"
)

// secureEtcd is an embedded etcd that serves clients over TLS only,
// requires a client certificate signed by its CA, and has authentication
// on, with baton's roles set up for prefix and one user per identity.
type secureEtcd struct {
	t      *testing.T
	etcd   *etcdcluster.Cluster
	pki    *testutil.PKI
	prefix string
}

const securePrefix = "/sec"

func startSecureEtcd(t *testing.T) *secureEtcd {
	pki := testutil.NewPKI(t, "etcd-ca")
	cert, key := pki.Issue("etcd-member")
	started := time.Now()
	e := testutil.EtcdWith(t, etcdcluster.Config{
		Members:         1,
		FastTimings:     true,
		TLSCertFile:     cert,
		TLSKeyFile:      key,
		TLSClientCAFile: pki.CAFile,
		ClientTLS:       pki.ClientTLS("root"),
		RootPassword:    "root-secret",
	})
	t.Logf("etcd with client-cert TLS and auth up in %v", time.Since(started))
	s := &secureEtcd{t: t, etcd: e, pki: pki, prefix: securePrefix}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := coord.SetupRoles(ctx, e.Client(), securePrefix); err != nil {
		t.Fatal(err)
	}
	if err := coord.SetupRoles(ctx, e.Client(), securePrefix); err != nil {
		t.Fatalf("SetupRoles run a second time: %v", err)
	}
	for user, role := range map[string]string{"srv-a": coord.RoleServer, "srv-b": coord.RoleServer, "wrk": coord.RoleWorker} {
		if _, err := e.Client().UserAdd(ctx, user, user+"-secret"); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Client().UserGrantRole(ctx, user, role); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// clientConfig is what a baton process builds: ClientConfig with the
// deployment's CA, its own certificate, and its user.
func (s *secureEtcd) clientConfig(user, password string, tlsCfg *tls.Config) clientv3.Config {
	cfg := coord.ClientConfig(s.etcd.Endpoints(), testutil.Logger(s.t).Named(user))
	cfg.TLS, cfg.Username, cfg.Password = tlsCfg, user, password
	return cfg
}

// dial connects as user with its password and a certificate of its own.
func (s *secureEtcd) dial(user string) *clientv3.Client {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, err := coord.DialConfig(ctx, s.clientConfig(user, user+"-secret", s.pki.ClientTLS(user)))
	if err != nil {
		s.t.Fatalf("dial as %s: %v", user, err)
	}
	s.t.Cleanup(func() { cli.Close() })
	return cli
}

func (s *secureEtcd) node(id string) *server.Node {
	s.t.Helper()
	return s.nodeWith(s.dial("srv-"+id), id)
}

// Under the least-privilege roles, over client-cert TLS: an election, a
// handover, a crash failover and a worker's discovery all work.
func TestRolesAreEnoughForElectionHandoverFailoverAndDiscovery(t *testing.T) {
	s := startSecureEtcd(t)
	a, b := s.node("a"), s.node("b")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}

	wcfg := worker.DefaultConfig()
	wcfg.AppName, wcfg.Client, wcfg.Prefix = "orders", s.dial("wrk"), s.prefix
	wcfg.Logger = testutil.Logger(t).Named("worker")
	d, err := worker.New(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx); err != nil { // its acquire elects the app's first owner
		t.Fatalf("worker start as a %s user: %v", coord.RoleWorker, err)
	}
	defer d.Close()
	first, ok := d.Current()
	if !ok || first.ServerID == "" {
		t.Fatalf("worker found %+v, %v", first, ok)
	}
	owner, other := a, b
	if first.ServerID == "b" {
		owner, other = b, a
	}
	follows := func(n *server.Node, what string) {
		testutil.Eventually(t, 10*time.Second, "the worker to follow "+what, func() bool {
			cur, ok := d.Current()
			_, acting := n.Elector().Ownership(app.ID)
			return ok && acting && cur.ServerID == n.ID() && cur.Address == n.Addr()
		})
	}
	follows(owner, "the first owner")

	if _, err := owner.Elector().HandOver(ctx, app.ID); err != nil {
		t.Fatalf("handover as a %s user: %v", coord.RoleServer, err)
	}
	follows(other, "the handover")

	servertest.Crash(other)
	follows(owner, "the crash failover")

	// Close hands the app on (nobody is left) and revokes the lease: etcd
	// lets a baton-server user revoke its own lease, whose keys are all
	// under the prefix.
	lease := owner.Session().Lease()
	if err := owner.Close(ctx); err != nil {
		t.Fatalf("close as a %s user: %v", coord.RoleServer, err)
	}
	if ttl, err := s.etcd.Client().TimeToLive(ctx, lease); err != nil || ttl.TTL != -1 {
		t.Fatalf("lease after Close: %+v, %v; want it revoked", ttl, err)
	}
}

// A worker identity can read where its server is and do nothing else; a
// server identity cannot touch keys outside its prefix. Each attempt is
// refused by etcd with a permission error.
func TestIdentitiesAreRefusedWhatTheirRoleDoesNotAllow(t *testing.T) {
	s := startSecureEtcd(t)
	a := s.node("a")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	keys, _ := keyspace.New(s.prefix)
	owner := keys.Owner(app.ID)
	serverLease := a.Session().Lease()

	wrk := s.dial("wrk")
	if _, err := wrk.Get(ctx, owner); err != nil {
		t.Fatalf("a worker cannot read its owner key: %v", err)
	}
	denied := func(who, what string, err error) {
		t.Helper()
		if !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("%s: %s: got %v, want etcd's permission error", who, what, err)
			return
		}
		t.Logf("%s: %s: %v", who, what, err)
	}
	_, err = wrk.Put(ctx, owner, "mine")
	denied("worker", "put its owner key", err)
	_, err = wrk.Delete(ctx, owner)
	denied("worker", "delete its owner key", err)
	_, err = wrk.Put(ctx, keys.AppSeq(), "99")
	denied("worker", "put the app sequence", err)
	_, err = wrk.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(owner), ">", 0)).Then(clientv3.OpDelete(owner)).Commit()
	denied("worker", "delete in a Txn", err)
	_, err = wrk.Revoke(ctx, serverLease)
	denied("worker", "revoke the server's lease", err)
	_, err = wrk.Get(ctx, s.prefix+"/locks/", clientv3.WithPrefix())
	denied("worker", "read the mutex keys", err)
	_, err = wrk.Put(ctx, "/elsewhere", "x")
	denied("worker", "put outside the prefix", err)
	// Granting a lease needs no permission in etcd (a lease alone touches
	// no key); with it a worker still cannot attach anything.
	if grant, err := wrk.Grant(ctx, 5); err == nil {
		_, err = wrk.Put(ctx, owner, "mine", clientv3.WithLease(grant.ID))
		denied("worker", "put its owner key under a lease of its own", err)
		t.Logf("worker: grant a lease: allowed by etcd (lease %x)", grant.ID)
	} else {
		t.Logf("worker: grant a lease: %v", err)
	}
	if v, err := s.etcd.Client().Get(ctx, owner); err != nil || len(v.Kvs) != 1 {
		t.Fatalf("owner key after the worker's attempts: %v, %v", v, err)
	} else if rec, err := coord.DecodeOwnerRecord(v.Kvs[0].Value); err != nil || rec.ServerID != "a" {
		t.Fatalf("owner key after the worker's attempts: %+v, %v", rec, err)
	}

	srv := s.dial("srv-b")
	_, err = srv.Put(ctx, "/elsewhere", "x")
	denied("server", "put outside the prefix", err)
	_, err = srv.Get(ctx, "/", clientv3.WithPrefix())
	denied("server", "read the whole keyspace", err)
	_, err = srv.Delete(ctx, "/secure", clientv3.WithPrefix()) // sorts next to the prefix, not under it
	denied("server", "delete a neighbour of the prefix", err)
	_, err = srv.Put(ctx, s.prefix, "x") // the prefix itself, without its "/"
	denied("server", "put the bare prefix key", err)
	outside, err := s.etcd.Client().Grant(ctx, 30)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.etcd.Client().Put(ctx, "/elsewhere/held", "x", clientv3.WithLease(outside.ID)); err != nil {
		t.Fatal(err)
	}
	_, err = srv.Revoke(ctx, outside.ID)
	denied("server", "revoke a lease holding keys outside the prefix", err)
}

// Wrong credentials fail at once with etcd's own error, not after a
// timeout; so does a certificate from another CA.
func TestWrongCredentialsFailFastAndClearly(t *testing.T) {
	s := startSecureEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err := coord.DialConfig(ctx, s.clientConfig("srv-a", "wrong", s.pki.ClientTLS("srv-a")))
	if !errors.Is(err, rpctypes.ErrAuthFailed) {
		t.Errorf("wrong password: %v, want etcd's authentication error", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("wrong password took %v to fail", took)
	}
	t.Logf("wrong password: %v (after %v)", err, time.Since(start))

	start = time.Now()
	stranger := testutil.NewPKI(t, "other-ca")
	tlsCfg := stranger.ClientTLS("srv-a")
	tlsCfg.RootCAs = s.pki.Pool // trusts the members; presents a certificate they do not trust
	_, err = coord.DialConfig(ctx, s.clientConfig("srv-a", "srv-a-secret", tlsCfg))
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client certificate from another CA: %v, want an error that names the certificate", err)
	}
	// clientv3.New logs in within its DialTimeout (5 s), then the
	// refusal is diagnosed.
	if took := time.Since(start); took > 8*time.Second {
		t.Errorf("a foreign client certificate took %v to fail", took)
	}
	t.Logf("foreign client certificate: %v (after %v)", err, time.Since(start))

	// Without credentials no login happens in clientv3.New: the probe
	// notices the refused TLS within about a second.
	start = time.Now()
	cfg := coord.ClientConfig(s.etcd.Endpoints(), testutil.Logger(t))
	cfg.TLS = &tls.Config{RootCAs: s.pki.Pool, MinVersion: tls.VersionTLS12} // no client certificate
	_, err = coord.DialConfig(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("no client certificate: %v, want an error that names the certificate", err)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("no client certificate took %v to fail", took)
	}
	t.Logf("no client certificate: %v (after %v)", err, time.Since(start))
}

// examples/node reaches a TLS etcd with auth from its flags, the password
// from the environment (never a flag), and serves under the server role.
func TestNodeExampleDialsTLSAndAuthFromItsFlags(t *testing.T) {
	s := startSecureEtcd(t)
	cert, key := s.pki.Issue("srv-a")
	cmd := exec.Command(nodeBinary, "-etcd", strings.Join(s.etcd.Endpoints(), ","), "-prefix", s.prefix,
		"-etcd-cacert", s.pki.CAFile, "-etcd-cert", cert, "-etcd-key", key, "-etcd-user", "srv-a",
		"-listen", "127.0.0.1:0", "-id", "a", "-ttl", "1s", "-apps", "orders", "-log-level", nodeLogLevel())
	cmd.Env = append(os.Environ(), coord.PasswordEnv+"=srv-a-secret")
	cmd.Stderr = logWriter{t: t, logger: testutil.Logger(t).Named("node")}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			t.Error("node did not exit within 15 s of SIGTERM")
			cmd.Process.Kill()
			<-exited
		}
	}()
	started := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.Contains(sc.Text(), `"event":"started"`) {
				started <- sc.Text()
			}
		}
	}()
	select {
	case line := <-started:
		t.Logf("node started: %s", line)
	case err := <-exited:
		t.Fatalf("node exited: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("node did not start within 20 s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys, _ := keyspace.New(s.prefix)
	resp, err := s.etcd.Client().Get(ctx, keys.ServerPrefix(), clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("membership of the node: %v, %v", resp, err)
	}
}
