package integration

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"golang.org/x/crypto/bcrypt"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// addUser adds user with role (password user+"-secret") through root.
func (s *secureEtcd) addUser(user string, roles ...string) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.etcd.Client().UserAdd(ctx, user, user+"-secret"); err != nil {
		s.t.Fatal(err)
	}
	for _, role := range roles {
		if _, err := s.etcd.Client().UserGrantRole(ctx, user, role); err != nil {
			s.t.Fatal(err)
		}
	}
}

// nodeWith starts a node as user with the given client and edits.
func (s *secureEtcd) nodeWith(cli *clientv3.Client, id string, edit ...func(*server.Config)) *server.Node {
	s.t.Helper()
	cfg := server.DefaultConfig()
	cfg.Client, cfg.Prefix, cfg.ServerID, cfg.TTL, cfg.Listen = cli, s.prefix, id, time.Second, "127.0.0.1:0"
	cfg.Logger = testutil.Logger(s.t).Named(id)
	cfg.Election.PingTimeout = 300 * time.Millisecond
	for _, f := range edit {
		f(&cfg)
	}
	n, err := server.NewNode(cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		s.t.Fatalf("start node %s: %v", id, err)
	}
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Close(ctx)
	})
	return n
}

// The less common server paths under baton-server alone: a takeover of an
// owner that does not answer pings (it writes a displacement marker bound
// to the displaced owner's lease), the displaced owner deleting its
// marker, a lease lost in etcd and re-granted with membership re-written,
// a drain and its revoke.
func TestBreakServerRoleTakeoverMarkerRegrantDrain(t *testing.T) {
	s := startSecureEtcd(t)
	keys, _ := keyspace.New(s.prefix)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	root := s.etcd.Client()

	// a: alive in etcd but unreachable over HTTP (its control address
	// points at a port nobody listens on).
	a := s.nodeWith(s.dial("srv-a"), "a", func(c *server.Config) {
		c.Listen = ""
		c.Control = coord.Endpoint{Address: "127.0.0.1:1"}
	})
	b := s.node("b")
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatalf("elect at a: %v", err)
	}
	aLease := a.Session().Lease()
	// b finds a unreachable and takes the app over, writing a marker.
	if _, err := b.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Logf("elect at b (takeover of an unreachable owner): %v", err)
	}
	sawMarker := false
	testutil.Eventually(t, 15*time.Second, "b to own the app after the takeover", func() bool {
		if r, err := root.Get(ctx, keys.DisplacedPrefix(), clientv3.WithPrefix()); err == nil && len(r.Kvs) > 0 {
			sawMarker = true
		}
		if _, acting := b.Elector().Ownership(app.ID); acting {
			return true
		}
		b.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, "")
		return false
	})
	t.Logf("marker seen while b took over: %v", sawMarker)
	// The marker goes (a deletes it, under its role) while a's lease lives.
	testutil.Eventually(t, 10*time.Second, "the displacement marker to be deleted", func() bool {
		r, err := root.Get(ctx, keys.DisplacedPrefix(), clientv3.WithPrefix())
		return err == nil && len(r.Kvs) == 0
	})
	if ttl, err := root.TimeToLive(ctx, aLease); err != nil || ttl.TTL == -1 {
		t.Fatalf("a's lease after the takeover: %+v, %v", ttl, err)
	}

	// Lease loss: root revokes b's lease; b's session re-grants and
	// re-writes its membership key under its role.
	bLease := b.Session().Lease()
	if _, err := root.Revoke(ctx, bLease); err != nil {
		t.Fatal(err)
	}
	bKey, _ := keys.Server("b")
	testutil.Eventually(t, 15*time.Second, "b to re-register on a new lease", func() bool {
		r, err := root.Get(ctx, bKey)
		return err == nil && len(r.Kvs) == 1 && clientv3.LeaseID(r.Kvs[0].Lease) != bLease &&
			clientv3.LeaseID(r.Kvs[0].Lease) == b.Session().Lease()
	})
	// And it can own the app again (the app was orphaned by the revoke).
	testutil.Eventually(t, 15*time.Second, "someone to own the app again", func() bool {
		_, aActs := a.Elector().Ownership(app.ID)
		_, bActs := b.Elector().Ownership(app.ID)
		if !aActs && !bActs {
			b.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, "")
		}
		return aActs || bActs
	})

	// Drain b: it hands over (or not) and revokes its lease.
	lease := b.Session().Lease()
	if err := b.Drain(ctx); err != nil {
		t.Errorf("drain as a %s user: %v", coord.RoleServer, err)
	}
	if ttl, err := root.TimeToLive(ctx, lease); err != nil || ttl.TTL != -1 {
		t.Errorf("b's lease after its drain: %+v, %v; want revoked", ttl, err)
	}
}

// Worker identity: a fresh watch after its connection broke, the ranked
// servers, and the refusals the README lists, plus keeping a server's
// lease alive and writing in a Txn.
func TestBreakWorkerRoleResyncAndRefusals(t *testing.T) {
	s := startSecureEtcd(t)
	keys, _ := keyspace.New(s.prefix)
	a, b := s.node("a"), s.node("b")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}

	// The worker reaches etcd through a TCP proxy that the test breaks.
	p, purl := testutil.Proxy(t, s.etcd.Endpoint(0))
	ep := strings.Replace(purl, "http://", "https://", 1)
	cfg := coord.ClientConfig([]string{ep}, testutil.Logger(t).Named("wrk"))
	cfg.TLS, cfg.Username, cfg.Password = s.pki.ClientTLS("wrk"), "wrk", "wrk-secret"
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	wcli, err := coord.DialConfig(dctx, cfg)
	dcancel()
	if err != nil {
		t.Fatal(err)
	}
	defer wcli.Close()
	wcfg := worker.DefaultConfig()
	wcfg.AppName, wcfg.Client, wcfg.Prefix = "orders", wcli, s.prefix
	wcfg.Servers = []string{a.Addr(), b.Addr()}
	wcfg.Interval = 500 * time.Millisecond
	wcfg.EtcdGrace = 500 * time.Millisecond
	wcfg.Logger = testutil.Logger(t).Named("worker")
	d, err := worker.New(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx); err != nil {
		t.Fatalf("worker start: %v", err)
	}
	defer d.Close()
	owner := func() *server.Node {
		if _, acting := a.Elector().Ownership(app.ID); acting {
			return a
		}
		if _, acting := b.Elector().Ownership(app.ID); acting {
			return b
		}
		return nil
	}
	testutil.Eventually(t, 10*time.Second, "an owner the worker follows", func() bool {
		o := owner()
		cur, ok := d.Current()
		return o != nil && ok && cur.ServerID == o.ID()
	})

	// Break the worker's connection: close the proxy, hand the app over,
	// start the proxy again.
	p.Close()
	o := owner()
	other := a
	if o == a {
		other = b
	}
	if _, err := o.Elector().HandOver(ctx, app.ID); err != nil {
		t.Fatal(err)
	}
	testutil.ProxyAt(t, purl, s.etcd.Endpoint(0))
	testutil.Eventually(t, 20*time.Second, "the worker to follow the handover after its watch broke", func() bool {
		cur, ok := d.Current()
		return ok && cur.ServerID == other.ID()
	})
	// Once etcd serves again the worker watches again (a handover is
	// followed by the watch, not polling): a second handover.
	if _, err := other.Elector().HandOver(ctx, app.ID); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the worker to follow a second handover", func() bool {
		cur, ok := d.Current()
		return ok && cur.ServerID == o.ID()
	})

	// Refusals.
	wrk := s.dial("wrk")
	serverLease := a.Session().Lease()
	denied := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("worker: %s: got %v, want etcd's permission error", what, err)
		}
	}
	_, err = wrk.KeepAliveOnce(ctx, serverLease)
	denied("keep a server's lease alive", err)
	_, err = wrk.Txn(ctx).Then(clientv3.OpPut(keys.Owner(app.ID), "x")).Commit()
	denied("put in a Txn", err)
	_, err = wrk.Txn(ctx).If(clientv3.Compare(clientv3.Version(keys.Owner(app.ID)), ">", 0)).Else(clientv3.OpDelete(keys.ServerPrefix(), clientv3.WithPrefix())).Commit()
	denied("delete in a Txn's else branch", err)
	_, err = wrk.Txn(ctx).Then(clientv3.OpGet(s.prefix+"/locks/", clientv3.WithPrefix())).Commit()
	denied("read the mutex keys in a Txn", err)
	_, err = wrk.Get(ctx, keys.DisplacedPrefix(), clientv3.WithPrefix())
	denied("read the displacement markers", err)
	_, err = wrk.Get(ctx, s.prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	denied("count the whole prefix", err)
	// Allowed while the lease holds only keys the worker may read anyway
	// (membership, owner keys): not a leak.
	ttl, err := wrk.TimeToLive(ctx, serverLease, clientv3.WithAttachedKeys())
	t.Logf("worker: a server lease's keys: %v, %v", ttl, err)
	_, err = wrk.Delete(ctx, keys.ServerPrefix(), clientv3.WithPrefix())
	denied("delete the membership keys", err)
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	if resp, ok := <-wrk.Watch(wctx, s.prefix+"/locks/", clientv3.WithPrefix()); !ok || resp.Err() == nil || !strings.Contains(resp.Err().Error(), "permission denied") {
		t.Errorf("worker: watch the mutex keys: %v (answered %v, canceled %v), want etcd's permission error", resp.Err(), ok, resp.Canceled)
	}
	wcancel()
}

// A server identity stays inside its prefix: neighbours that share the
// prefix's string, ranges that start inside and end outside, from-key
// reads, watches and Txn compares outside.
func TestBreakServerRoleStaysInsideItsPrefix(t *testing.T) {
	s := startSecureEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	root := s.etcd.Client()
	for _, k := range []string{"/sec2/apps/seq", "/sec0", "/sec", "/sec.x", "/sec-b/current-server/1"} {
		if _, err := root.Put(ctx, k, "neighbour"); err != nil {
			t.Fatal(err)
		}
	}
	srv := s.dial("srv-a")
	if _, err := srv.Put(ctx, s.prefix+"/ok", "x"); err != nil {
		t.Fatalf("put inside the prefix: %v", err)
	}
	denied := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("server: %s: got %v, want etcd's permission error", what, err)
		}
	}
	for _, k := range []string{"/sec2/apps/seq", "/sec0", "/sec", "/sec.x", "/sec-b/current-server/1"} {
		_, err := srv.Get(ctx, k)
		denied("get "+k, err)
		_, err = srv.Put(ctx, k, "x")
		denied("put "+k, err)
		_, err = srv.Delete(ctx, k)
		denied("delete "+k, err)
	}
	_, err := srv.Get(ctx, "/sec2/", clientv3.WithPrefix())
	denied("get prefix /sec2/", err)
	_, err = srv.Get(ctx, s.prefix+"/", clientv3.WithRange("/sec1"))
	denied("a range from inside to past the prefix", err)
	_, err = srv.Get(ctx, s.prefix+"/", clientv3.WithFromKey())
	denied("a from-key read from the prefix", err)
	_, err = srv.Delete(ctx, s.prefix+"/", clientv3.WithFromKey())
	denied("a from-key delete from the prefix", err)
	_, err = srv.Get(ctx, "/sec", clientv3.WithPrefix()) // "/sec" as a string prefix covers /sec2, /sec-b
	denied("get string prefix /sec", err)
	_, err = srv.Txn(ctx).If(clientv3.Compare(clientv3.Value("/sec2/apps/seq"), "=", "neighbour")).Then(clientv3.OpPut(s.prefix+"/ok", "y")).Commit()
	denied("a Txn comparing a key outside", err)
	_, err = srv.Txn(ctx).Then(clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpPut("/sec2/x", "y")}, nil)).Commit()
	denied("a nested Txn writing outside", err)
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	if resp, ok := <-srv.Watch(wctx, "/sec2/", clientv3.WithPrefix()); !ok || resp.Err() == nil || !strings.Contains(resp.Err().Error(), "permission denied") {
		t.Errorf("server: watch /sec2/: %v (answered %v), want etcd's permission error", resp.Err(), ok)
	}
	wcancel()

	// A lease holding a key inside and one in a neighbouring prefix.
	mixed, err := root.Grant(ctx, 30)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{s.prefix + "/servers/x", "/sec2/servers/x"} {
		if _, err := root.Put(ctx, k, "x", clientv3.WithLease(mixed.ID)); err != nil {
			t.Fatal(err)
		}
	}
	_, err = srv.Revoke(ctx, mixed.ID)
	denied("revoke a lease with a key in /sec2/", err)
	_, err = srv.KeepAliveOnce(ctx, mixed.ID)
	denied("keep alive a lease with a key in /sec2/", err)
	// Attaching a key of its own to a foreign lease: etcd checks the
	// lease's other keys.
	_, err = srv.Put(ctx, s.prefix+"/servers/y", "x", clientv3.WithLease(mixed.ID))
	denied("put under a lease that holds a key in /sec2/", err)
	if r, err := root.Get(ctx, "/sec", clientv3.WithPrefix()); err == nil {
		for _, kv := range r.Kvs {
			if strings.HasPrefix(string(kv.Key), "/sec/") {
				continue
			}
			if string(kv.Value) != "neighbour" && string(kv.Key) != "/sec2/servers/x" {
				t.Errorf("neighbour key %s changed to %q", kv.Key, kv.Value)
			}
		}
	}
}

// A node started with an identity etcd does not let do a server's work
// (a worker's user, a server user of another prefix, a user with no role)
// or with a client whose TLS etcd refuses must fail Start quickly and
// clearly, not retry until ctx ends.
func TestBreakNodeStartWithTheWrongIdentityFailsFast(t *testing.T) {
	s := startSecureEtcd(t)
	s.addUser("nobody")
	stranger := testutil.NewPKI(t, "stranger-ca")
	wrongCA := &tls.Config{RootCAs: stranger.Pool, Certificates: s.pki.ClientTLS("x").Certificates, MinVersion: tls.VersionTLS12}
	cases := []struct {
		name   string
		client func() (*clientv3.Client, error)
	}{
		{"worker user", func() (*clientv3.Client, error) { return s.dial("wrk"), nil }},
		{"user without a role", func() (*clientv3.Client, error) { return s.dial("nobody"), nil }},
		{"client trusting another CA (clientv3.New, no user)", func() (*clientv3.Client, error) {
			cfg := coord.ClientConfig(s.etcd.Endpoints(), testutil.Logger(t))
			cfg.TLS = wrongCA
			return clientv3.New(cfg)
		}},
		{"client without a client certificate (clientv3.New, no user)", func() (*clientv3.Client, error) {
			cfg := coord.ClientConfig(s.etcd.Endpoints(), testutil.Logger(t))
			cfg.TLS = &tls.Config{RootCAs: s.pki.Pool, MinVersion: tls.VersionTLS12}
			return clientv3.New(cfg)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cli, err := c.client()
			if err != nil {
				t.Logf("client: %v", err)
				return
			}
			defer cli.Close()
			cfg := server.DefaultConfig()
			cfg.Client, cfg.Prefix, cfg.ServerID, cfg.TTL, cfg.Listen = cli, s.prefix, "x", time.Second, "127.0.0.1:0"
			cfg.Logger = testutil.Logger(t).Named("x")
			n, err := server.NewNode(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			start := time.Now()
			err = n.Start(ctx)
			took := time.Since(start)
			if err == nil {
				n.Close(ctx)
				t.Fatalf("Start succeeded")
			}
			t.Logf("Start: %v (after %v)", err, took)
			if took > 5*time.Second {
				t.Errorf("Start took %v to fail (ctx 15 s): %v", took, err)
			}
			if errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "permission") && !strings.Contains(err.Error(), "certificate") {
				t.Errorf("Start failed with only the deadline, not the cause: %v", err)
			}
		})
	}
}

// DialConfig with a user and a client that does not trust the members'
// CA: a clear error, quickly.
func TestBreakDialWithAUserAndTheWrongCAFailsFast(t *testing.T) {
	s := startSecureEtcd(t)
	stranger := testutil.NewPKI(t, "stranger-ca")
	tlsCfg := s.pki.ClientTLS("srv-a")
	tlsCfg.RootCAs = stranger.Pool
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err := coord.DialConfig(ctx, s.clientConfig("srv-a", "srv-a-secret", tlsCfg))
	took := time.Since(start)
	t.Logf("wrong CA with a user: %v (after %v)", err, took)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("wrong CA with a user: %v, want an error naming the certificate", err)
	}
	if took > 3*time.Second {
		t.Errorf("wrong CA with a user took %v to fail", took)
	}
}

// DialConfig honours its ctx when the login cannot complete (a client that
// does not trust the members' CA, with a user): ctx 1 s.
func TestBreakDialHonoursCtxWithAUserAndTheWrongCA(t *testing.T) {
	s := startSecureEtcd(t)
	stranger := testutil.NewPKI(t, "stranger-ca")
	tlsCfg := s.pki.ClientTLS("srv-a")
	tlsCfg.RootCAs = stranger.Pool
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	_, err := coord.DialConfig(ctx, s.clientConfig("srv-a", "srv-a-secret", tlsCfg))
	took := time.Since(start)
	t.Logf("wrong CA with a user, ctx 1 s: %v (after %v)", err, took)
	if took > 2*time.Second {
		t.Errorf("DialConfig with a 1 s ctx took %v", took)
	}
}

// Authentication cost: etcd's clientv3 logs in again (Authenticate:
// bcrypt and a raft write on the members) each time it opens a stream as
// a password user, and the session's KeepAliveOnce opens one each round.
// A certificate identity (etcd takes the user from the client
// certificate's CN; no password) never logs in: an idle node of that kind
// must cause no login at all. The password figure is logged for
// comparison (README, Security).
func TestCertificateIdentitiesNeverLogIn(t *testing.T) {
	s := startSecureEtcd(t)
	count := func() float64 {
		mfs, err := prometheus.DefaultGatherer.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var total float64
		for _, mf := range mfs {
			if mf.GetName() != "grpc_server_handled_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				if label(m, "grpc_method") == "Authenticate" {
					total += m.GetCounter().GetValue()
				}
			}
		}
		return total
	}
	idle := func(what string, n *server.Node) float64 {
		before := count()
		start := time.Now()
		testutil.Eventually(t, 10*time.Second, "3 s to pass", func() bool { return time.Since(start) > 3*time.Second })
		logins := count() - before
		t.Logf("an idle node with TTL 1 s, %s: %.0f etcd logins in %v", what, logins, time.Since(start))
		return logins
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, err := coord.DialConfig(ctx, s.clientConfig("", "", s.pki.ClientTLS("srv-b")))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	byCert := s.nodeWith(cli, "b")
	if logins := idle("certificate identity", byCert); logins != 0 {
		t.Errorf("a node with a certificate identity logged in %.0f times", logins)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	byCert.Close(ctx2)
	cancel2()
	idle("password identity", s.node("a"))
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// startEtcdWithTokenTTL starts one embedded etcd member directly (the
// test cluster has no AuthTokenTTL setting) with simple tokens that
// expire after ttl seconds unused, auth on, baton's roles and users.
func startEtcdWithTokenTTL(t *testing.T, ttl uint) (endpoint string, root *clientv3.Client) {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Name = "m0"
	cfg.Dir = t.TempDir()
	ports := make([]string, 2)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().String()
		l.Close()
	}
	cu, _ := url.Parse("http://" + ports[0])
	pu, _ := url.Parse("http://" + ports[1])
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = "m0=" + pu.String()
	cfg.TickMs, cfg.ElectionMs, cfg.UnsafeNoFsync = 10, 100, true
	cfg.BcryptCost = uint(bcrypt.MinCost) // password users log in at every stream (see etcdcluster)
	cfg.AuthTokenTTL = ttl
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(20 * time.Second):
		t.Fatal("etcd not ready")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	anon, err := coord.Dial(ctx, []string{cu.String()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	anon.UserAdd(ctx, "root", "root-secret")
	anon.UserGrantRole(ctx, "root", "root")
	if _, err := anon.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
	anon.Close()
	rcfg := coord.ClientConfig([]string{cu.String()}, nil)
	rcfg.Username, rcfg.Password = "root", "root-secret"
	root, err = coord.DialConfig(ctx, rcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	if err := coord.SetupRoles(ctx, root, securePrefix); err != nil {
		t.Fatal(err)
	}
	for user, role := range map[string]string{"srv-a": coord.RoleServer, "srv-b": coord.RoleServer, "wrk": coord.RoleWorker} {
		root.UserAdd(ctx, user, user+"-secret")
		root.UserGrantRole(ctx, user, role)
	}
	return cu.String(), root
}

// With etcd's simple tokens expiring after 1 s unused, a server and a
// worker that sit idle for longer keep working: handovers, the worker's
// watch and re-checks, a drain.
func TestBreakExpiredSimpleTokens(t *testing.T) {
	ep, root := startEtcdWithTokenTTL(t, 1)
	dial := func(user string) *clientv3.Client {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cfg := coord.ClientConfig([]string{ep}, testutil.Logger(t).Named(user))
		cfg.Username, cfg.Password = user, user+"-secret"
		cli, err := coord.DialConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		return cli
	}
	s := &secureEtcd{t: t, prefix: securePrefix}
	a := s.nodeWith(dial("srv-a"), "a", func(c *server.Config) { c.TTL = 3 * time.Second })
	b := s.nodeWith(dial("srv-b"), "b", func(c *server.Config) { c.TTL = 3 * time.Second })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	wcfg := worker.DefaultConfig()
	wcfg.AppName, wcfg.Client, wcfg.Prefix = "orders", dial("wrk"), securePrefix
	wcfg.Servers = []string{a.Addr(), b.Addr()}
	wcfg.Logger = testutil.Logger(t).Named("worker")
	d, err := worker.New(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	owner := func() (o, other *server.Node) {
		testutil.Eventually(t, 10*time.Second, "a or b to act for the app", func() bool {
			for _, pair := range [][2]*server.Node{{a, b}, {b, a}} {
				if _, acting := pair[0].Elector().Ownership(app.ID); acting {
					o, other = pair[0], pair[1]
					return true
				}
			}
			return false
		})
		return o, other
	}
	for i := 0; i < 3; i++ {
		idle := time.Now()
		testutil.Eventually(t, 10*time.Second, "2.5 s of idleness (tokens expire)", func() bool { return time.Since(idle) > 2500*time.Millisecond })
		o, other := owner()
		if _, err := o.Elector().HandOver(ctx, app.ID); err != nil {
			t.Fatalf("handover %d after the tokens expired: %v", i, err)
		}
		testutil.Eventually(t, 10*time.Second, "the worker to follow", func() bool {
			cur, ok := d.Current()
			return ok && cur.ServerID == other.ID()
		})
	}
	idle := time.Now()
	testutil.Eventually(t, 10*time.Second, "2.5 s of idleness", func() bool { return time.Since(idle) > 2500*time.Millisecond })
	lease := a.Session().Lease()
	if err := a.Drain(ctx); err != nil {
		t.Errorf("drain after the tokens expired: %v", err)
	}
	if ttl, err := root.TimeToLive(ctx, lease); err != nil || ttl.TTL != -1 {
		t.Errorf("a's lease after the drain: %+v, %v", ttl, err)
	}
}
