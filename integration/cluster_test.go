package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/pkg/v3/proxy"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
)

const prefix = "/it"

// cluster is a 3-member etcd in this process and server nodes as child
// processes, each reaching every etcd member through a proxy of its own so
// that it can be cut off alone.
type cluster struct {
	t      *testing.T
	etcd   *etcdcluster.Cluster
	prefix string
	keys   keyspace.Keys
	ttl    time.Duration
	ttls   map[string]time.Duration // a node's own TTL, when not ttl
	args   []string                 // more flags for every node
	extra  map[string][]string      // more flags for one node, after args
	check  *checker
	nodes  map[string]*proc
	http   *http.Client
}

// proc is one server process.
type proc struct {
	id      string
	addr    string // where it listens; tests call it here
	cmd     *exec.Cmd
	proxies []proxy.Server
	peer    proxy.Server  // in front of addr for the other servers: cut it to part them
	front   proxy.Server  // in front of addr for workers: cut it to part them
	public  string        // front's address: what workers are told (-external)
	done    chan struct{} // closed when its stdout is drained
	exited  chan struct{} // closed when the process has exited
	ended   atomic.Bool   // set before the test kills or stops it
}

func newCluster(t *testing.T, ttl time.Duration) *cluster {
	return newClusterOn(t, testutil.Etcd(t, 3), prefix, ttl)
}

// newClusterOn is a cluster of its own under pfx on an etcd that other
// clusters may share.
func newClusterOn(t *testing.T, e *etcdcluster.Cluster, pfx string, ttl time.Duration) *cluster {
	keys, err := keyspace.New(pfx)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &cluster{t: t, etcd: e, prefix: pfx, keys: keys, ttl: ttl, ttls: map[string]time.Duration{}, extra: map[string][]string{},
		check: newChecker(), nodes: map[string]*proc{},
		http: &http.Client{Transport: tr, Timeout: 5 * time.Second}}
}

// ttlOf is the lease TTL node id runs with.
func (c *cluster) ttlOf(id string) time.Duration {
	if d, ok := c.ttls[id]; ok {
		return d
	}
	return c.ttl
}

func freeAddr(t *testing.T) string {
	// A server process is restarted on its old address after a SIGKILL.
	// A port from the ephemeral range can by then be the source port of
	// some outgoing connection (a proxy's, a client's), and the restart
	// fails to bind; ports below that range are never handed out so.
	low := ephemeralLow()
	for range 1000 {
		port := 10000 + rand.IntN(low-10000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l.Close()
		return l.Addr().String()
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

// ephemeralLow is the first port of the kernel's ephemeral range (32768
// when it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	var low, high int
	if _, err := fmt.Sscan(string(b), &low, &high); err != nil || low <= 11000 {
		return 32768
	}
	return low
}

// start runs examples/node as id and waits for its "started" line.
func (c *cluster) start(id string) *proc {
	c.t.Helper()
	p, err := c.startNode(id)
	if err != nil {
		c.t.Fatal(err)
	}
	return p
}

// startNode is start for goroutines other than the test's: it returns
// its error. The proxies of a node that ran as id before (and was
// killed) are closed first.
func (c *cluster) startNode(id string) (*proc, error) {
	t := c.t
	if old := c.nodes[id]; old != nil {
		select {
		case <-old.exited:
			for _, px := range append(old.proxies, old.peer, old.front) {
				px.Close()
			}
		default:
			return nil, fmt.Errorf("node %s is still running", id)
		}
	}
	p := &proc{id: id, addr: freeAddr(t), done: make(chan struct{}), exited: make(chan struct{})}
	var urls []string
	for i := range 3 {
		px, u := testutil.Proxy(t, c.etcd.Endpoint(i))
		p.proxies = append(p.proxies, px)
		urls = append(urls, u)
	}
	// Other servers ping it through a proxy of their own (its advertised
	// address); workers use its listen address (its external address).
	peer, peerURL := testutil.Proxy(t, "http://"+p.addr)
	p.peer = peer
	front, frontURL := testutil.Proxy(t, "http://"+p.addr)
	p.front, p.public = front, strings.TrimPrefix(frontURL, "http://")
	p.cmd = exec.Command(nodeBinary, "-etcd", strings.Join(urls, ","), "-listen", p.addr, "-id", id,
		"-advertise", strings.TrimPrefix(peerURL, "http://"), "-external", p.public,
		"-ttl", c.ttlOf(id).String(), "-prefix", c.prefix, "-log-level", nodeLogLevel())
	p.cmd.Args = append(p.cmd.Args, c.args...)
	p.cmd.Args = append(p.cmd.Args, c.extra[id]...)
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p.cmd.Stderr = logWriter{t: t, logger: testutil.Logger(t).Named(id)}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	started := make(chan struct{})
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stdout)
		once := false
		for sc.Scan() {
			var e nodeEvent
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			if e.Event == "started" && !once {
				once = true
				close(started)
			}
			c.check.add(e)
		}
		io.Copy(io.Discard, stdout)
	}()
	go func() { p.cmd.Wait(); close(p.exited) }()
	// Cleanups run in reverse: this one (registered after the proxies')
	// stops the process before its proxies close.
	t.Cleanup(func() { p.stop() })
	select {
	case <-started:
	case <-p.exited:
		return nil, fmt.Errorf("node %s exited at start", id)
	case <-time.After(30 * time.Second):
		p.ended.Store(true)
		p.cmd.Process.Kill()
		return nil, fmt.Errorf("node %s did not start", id)
	}
	c.nodes[id] = p
	return p, nil
}

// crashed reports whether p exited without the test killing or stopping
// it: its intervals were then never closed, and the run cannot go on.
func (p *proc) crashed() bool {
	select {
	case <-p.exited:
		return !p.ended.Load()
	default:
		return false
	}
}

// stop ends the process gracefully if it still runs (SIGCONT first, in
// case it is paused), then by SIGKILL.
func (p *proc) stop() {
	p.ended.Store(true)
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Signal(syscall.SIGCONT)
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(15 * time.Second):
			p.cmd.Process.Kill()
			<-p.exited
		}
	}
	<-p.done
}

// kill is a crash: SIGKILL, stamped on CLOCK_MONOTONIC just before the
// signal so that no interval of the dead process can end later than this.
func (c *cluster) kill(p *proc) {
	p.ended.Store(true)
	at := electiontest.MonoNow()
	p.cmd.Process.Kill()
	<-p.exited
	<-p.done
	c.check.killed(p.id, at)
}

func (p *proc) signal(s syscall.Signal) {
	if err := p.cmd.Process.Signal(s); err != nil {
		panic(err)
	}
}

// partition cuts the process off from every etcd member, or heals it.
// The proxies hold the traffic (pause) rather than drop it (blackhole): a
// real partition loses no bytes of a TCP stream, TCP retransmits them
// once it heals, while pkg/proxy's blackhole drops bytes mid-stream and
// leaves HTTP/2 connections corrupt (PROTOCOL_ERROR) until gRPC's
// keepalive replaces them ~12 s later.
func (p *proc) partition(cut bool) {
	for _, px := range p.proxies {
		if cut {
			px.PauseTx()
			px.PauseRx()
		} else {
			px.UnpauseTx()
			px.UnpauseRx()
		}
	}
}

// partitionFromPeers cuts the process off from the other servers only
// (their pings), or heals it.
func (p *proc) partitionFromPeers(cut bool) {
	if cut {
		p.peer.PauseTx()
		p.peer.PauseRx()
	} else {
		p.peer.UnpauseTx()
		p.peer.UnpauseRx()
	}
}

// pauseRx holds everything etcd sends the process (responses, watch
// events), or releases it; what the process sends still arrives. Its
// requests are served, and it learns nothing of it.
func (p *proc) pauseRx(cut bool) {
	for _, px := range p.proxies {
		if cut {
			px.PauseRx()
		} else {
			px.UnpauseRx()
		}
	}
}

// register registers n apps and returns their ids.
func (c *cluster) register(n int) []int64 {
	reg := testutil.Must(coord.NewRegistry(c.etcd.Client(), c.keys.Prefix()))
	var ids []int64
	for i := range n {
		app, err := reg.Register(context.Background(), fmt.Sprintf("app-%d", i))
		if err != nil {
			c.t.Fatal(err)
		}
		ids = append(ids, app.ID)
	}
	return ids
}

// acquire asks p's /server/acquire for app, as a worker would.
func (c *cluster) acquire(p *proc, app int64) (string, error) {
	u := fmt.Sprintf("http://%s/server/acquire?%s", p.addr, url.Values{"appId": {fmt.Sprint(app)}, "protocol": {"HTTP"}}.Encode())
	resp, err := c.http.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var r struct {
		Success bool   `json:"success"`
		Data    string `json:"data"`
		Message string `json:"message"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return "", err
	}
	if !r.Success {
		return "", fmt.Errorf("%s", r.Message)
	}
	return r.Data, nil
}

// ownAll has p elect itself for every app and waits until it acts for
// them.
func (c *cluster) ownAll(p *proc, apps []int64) {
	c.t.Helper()
	for _, app := range apps {
		if addr, err := c.acquire(p, app); err != nil || addr != p.public {
			c.t.Fatalf("acquire app %d on %s: %q, %v", app, p.id, addr, err)
		}
	}
	if _, err := c.check.waitOwned(apps, "", 10*time.Second); err != nil {
		c.t.Fatal(err)
	}
}

// ownerKey reads app's owner key: server id and token.
func (c *cluster) ownerKey(app int64) (string, int64) {
	resp, err := c.etcd.Client().Get(context.Background(), c.keys.Owner(app))
	if err != nil || len(resp.Kvs) == 0 {
		return "", 0
	}
	rec, _ := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
	return rec.ServerID, resp.Kvs[0].ModRevision
}

// assertVerdict fails the test on any violation the checker saw.
func (c *cluster) assertVerdict() {
	c.t.Helper()
	for _, p := range c.check.verdict() {
		c.t.Error(p)
	}
}

// logWriter forwards a child's stderr to the test log.
type logWriter struct {
	t      *testing.T
	logger interface{ Info(string, ...any) }
}

func (w logWriter) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		w.logger.Info(line)
	}
	return len(b), nil
}

// nodeLogLevel is the server processes' log level: warn, or
// BATON_NODE_LOG (info, debug) to diagnose a failing random run.
func nodeLogLevel() string {
	if v := os.Getenv("BATON_NODE_LOG"); v != "" {
		return v
	}
	return "warn"
}
