package election_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/pkg/v3/proxy"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
)

// node is one server of a test: its own client (optionally through a
// fault-injection proxy), session and elector.
type node struct {
	id      string
	addr    string
	cli     *clientv3.Client
	proxy   proxy.Server
	session *coord.Session
	el      *election.Elector
}

// testPingTimeout is every test node's PingTimeout.
const testPingTimeout = 200 * time.Millisecond

// pinger answers pings for the nodes of a test; a node marked down does
// not answer.
type pinger struct {
	mu    sync.Mutex
	nodes map[string]coord.Protocols // address → protocols
	ids   map[string]string          // address → server id
	down  map[string]bool
	asked map[string]int // pings per address
}

func (p *pinger) Ping(ctx context.Context, serverID string, control coord.Endpoint) (election.PingReply, error) {
	address := control.Address
	p.mu.Lock()
	protos, ok := p.nodes[address]
	id := p.ids[address]
	down := p.down[address]
	p.asked[address]++
	p.mu.Unlock()
	if !ok || down {
		<-ctx.Done() // an unreachable server times out
		return election.PingReply{}, fmt.Errorf("ping %s: %w", address, ctx.Err())
	}
	if id != serverID {
		return election.PingReply{}, fmt.Errorf("ping %s: answered by %s, not %s", address, id, serverID)
	}
	return election.PingReply{Protocols: protos}, nil
}

func (p *pinger) pings(address string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.asked[address]
}

func (p *pinger) setDown(address string, down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down[address] = down
}

// cluster is a set of nodes on one embedded etcd, with an event recorder
// shared by all their callbacks.
type cluster struct {
	t      testing.TB
	etcd   *etcdcluster.Cluster
	keys   keyspace.Keys
	pinger *pinger
	rec    *recorder
	ttl    time.Duration
	nodes  []*node
}

func newCluster(t testing.TB, etcdMembers int, ttl time.Duration) *cluster {
	e := testutil.Etcd(t, etcdMembers)
	keys, _ := keyspace.New("")
	return &cluster{
		t: t, etcd: e, keys: keys, ttl: ttl,
		pinger: &pinger{nodes: map[string]coord.Protocols{}, ids: map[string]string{}, down: map[string]bool{}, asked: map[string]int{}},
		rec:    newRecorder(),
	}
}

type nodeOption func(*nodeOpts)

type nodeOpts struct {
	viaProxy bool
	cfg      func(*election.Config)
	client   func(endpoints []string) *clientv3.Client
}

// withClient gives the node a client of the test's making.
func withClient(f func(endpoints []string) *clientv3.Client) nodeOption {
	return func(o *nodeOpts) { o.client = f }
}

func viaProxy() nodeOption { return func(o *nodeOpts) { o.viaProxy = true } }

func withConfig(f func(*election.Config)) nodeOption { return func(o *nodeOpts) { o.cfg = f } }

// addNode starts a server; it is closed (drain, then revoke) when the test
// ends unless the test closed it.
func (c *cluster) addNode(id string, opts ...nodeOption) *node {
	t := c.t
	t.Helper()
	var o nodeOpts
	for _, f := range opts {
		f(&o)
	}
	n := &node{id: id, addr: id + ":7700"}
	endpoints := c.etcd.Endpoints()
	if o.viaProxy {
		var url string
		n.proxy, url = testutil.Proxy(t, c.etcd.Endpoint(0))
		endpoints = []string{url}
	}
	if o.client != nil {
		n.cli = o.client(endpoints)
	} else {
		n.cli = testutil.Client(t, c.etcd, endpoints...)
	}
	protos := coord.Protocols{coord.ProtocolHTTP: {Address: n.addr}}
	c.pinger.mu.Lock()
	c.pinger.nodes[n.addr] = protos
	c.pinger.ids[n.addr] = id
	c.pinger.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	register, err := coord.MembershipOnLease(n.cli, c.keys.Prefix(), coord.ServerRecord{ServerID: id, Control: coord.Endpoint{Address: n.addr}, Protocols: protos, StartedAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	n.session, err = coord.NewSession(ctx, coord.SessionConfig{Client: n.cli, Prefix: c.keys.Prefix(), TTL: c.ttl, OnLease: register, Logger: testutil.Logger(t).Named(id)})
	if err != nil {
		t.Fatal(err)
	}
	cfg := election.DefaultConfig()
	cfg.ServerID = id
	cfg.Control, cfg.Protocols = coord.Endpoint{Address: n.addr}, protos
	cfg.Pinger = c.pinger
	cfg.PingTimeout = testPingTimeout
	cfg.Logger = testutil.Logger(t).Named(id)
	cfg.Callbacks = c.rec.callbacks(id)
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	n.el, err = election.New(ctx, n.session, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.close() })
	c.nodes = append(c.nodes, n)
	// Wait until every node sees every other, so successor choices agree.
	testutil.Eventually(t, 5*time.Second, "membership to settle", func() bool {
		for _, m := range c.nodes {
			if len(m.el.Members().Servers()) != len(c.nodes) {
				return false
			}
		}
		return true
	})
	return n
}

// close drains the node's elector and closes its session.
func (n *node) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n.el.Close(ctx)
	n.session.Close(ctx)
}

func (c *cluster) register(t testing.TB, names ...string) []int64 {
	t.Helper()
	reg := testutil.Must(coord.NewRegistry(c.etcd.Client(), c.keys.Prefix()))
	var ids []int64
	for _, name := range names {
		app, err := reg.Register(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, app.ID)
	}
	return ids
}

func (c *cluster) registerN(t testing.TB, n int) []int64 {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("app-%d", i)
	}
	return c.register(t, names...)
}

// ownerOf reads app's owner key from etcd: server id and token.
func (c *cluster) ownerOf(t testing.TB, app int64) (string, int64) {
	t.Helper()
	resp, err := c.etcd.Client().Get(context.Background(), c.keys.Owner(app))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return "", 0
	}
	rec, err := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	return rec.ServerID, resp.Kvs[0].ModRevision
}

func (c *cluster) node(id string) *node {
	for _, n := range c.nodes {
		if n.id == id {
			return n
		}
	}
	return nil
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
