package server_test

import (
	"context"
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// Promise 2: acquire answers the OWNER's transport address, never a
// non-owner's. An owner crashes and a new server process (with a new,
// generated id — the default) comes up on the same control address
// within the crashed owner's TTL, as a supervisor restarting it would.
// The owner key still names the dead owner; a peer pings its control
// address, the new process answers, and the peer sends workers to the
// new process's transport although it owns nothing.
func TestBreakAcquireNeverAnswersANonOwnerAfterControlAddressReuse(t *testing.T) {
	e := testutil.Etcd(t, 1)
	ctx := context.Background()
	a := startNode(t, e, "a", func(c *server.Config) {
		c.TTL = 5 * time.Second
		c.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.1:10010"}}
	})
	c := startNode(t, e, "c", func(c *server.Config) {
		c.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.3:10010"}}
	})
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	control := a.Addr()
	servertest.Crash(a)
	// The restarted process: same control address, another id, another
	// transport.
	startNode(t, e, "a-restarted", func(c *server.Config) {
		c.Listen = control
		c.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.2:10010"}}
	})
	owner := func() string {
		resp, err := e.Client().Get(ctx, mustKeys(t).Owner(app.ID))
		if err != nil || len(resp.Kvs) == 0 {
			return ""
		}
		rec, err := coord.DecodeOwnerRecord(resp.Kvs[0].Value)
		if err != nil {
			return "corrupt"
		}
		return rec.ServerID
	}
	w := newPJWorker(t, pjReleases[3], c.Addr())
	before := owner()
	got, answers := w.acquire(app.ID, coord.ProtocolHTTP)
	after := owner()
	t.Logf("owner key before %q, after %q; acquire at c answered %q (%+v)", before, after, got, answers)
	if got == "10.0.0.2:10010" && before == "a" && after == "a" {
		t.Fatalf("acquire sent the worker to a-restarted's transport %s, while the owner key names the crashed server a: a non-owner's address", got)
	}
}

// Promise 1: for a registered app, assert is accepted or makes the worker
// move on, never success:false. baton registers any name without control
// characters; a PowerJob worker puts it in the query unencoded
// ("/server/assert?appName=%s"; OkHttp leaves '+' as is), and the node
// reads '+' as a space.
func TestBreakAssertOfARegisteredNameIsNeverRefused(t *testing.T) {
	e := testutil.Etcd(t, 1)
	ctx := context.Background()
	registry := testutil.Must(coord.NewRegistry(e.Client(), ""))
	var apps []coord.AppRecord
	for _, name := range []string{"billing+eu", "r;d"} {
		app, err := registry.Register(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		apps = append(apps, app)
	}
	n := startNode(t, e, "s1")
	for _, app := range apps {
		id, a := newPJWorker(t, pjReleases[3], n.Addr()).assert(app.Name)
		if a.outcome == pjRefused || a.outcome == pjFatal {
			t.Errorf("assert of registered app %q (id %d): %s %q %s — the worker does not start", app.Name, app.ID, a.outcome, a.message, a.detail)
			continue
		}
		if id != app.ID {
			t.Errorf("assert of %q: id %d, %+v", app.Name, id, a)
		}
	}
}

// Promise 2: any protocol name the servers advertise works. The node
// accepts (Config.Protocols) a protocol name of up to 128 bytes, but
// acquire refuses names over 32 bytes with a 400.
func TestBreakAcquireWorksForEveryAdvertisedProtocol(t *testing.T) {
	e := testutil.Etcd(t, 1)
	long := "AKKA-" + strings.Repeat("x", 40)
	n := startNode(t, e, "s1", func(c *server.Config) {
		c.Protocols = coord.Protocols{long: {Address: "10.0.0.1:10086"}}
	})
	app, err := n.Registry().Register(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	got, answers := newPJWorker(t, pjReleases[3], n.Addr()).acquire(app.ID, long)
	if got != "10.0.0.1:10086" {
		t.Fatalf("acquire for the advertised protocol %q (%d bytes): %q, %+v", long, len(long), got, answers)
	}
}

// Promise 5 / compatibility: PowerJob's PingPongSocketServer (the version
// released with checkConnectivity, 4.3.9 on) writes "pong" with no line
// separator and closes the socket; PowerJob's own server reads it with
// BufferedReader.readLine, which returns "pong" at end of stream. baton
// requires a '\n' and answers false: the worker never gets a yes.
func TestBreakCheckConnectivityAcceptsPowerJobsPongWithoutNewline(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("pong")) // PingPongSocketServer: PONG, flush, close
			c.Close()
		}
	})
	t.Cleanup(func() { l.Close(); wg.Wait() })
	port := l.Addr().(*net.TCPAddr).Port
	a := newPJWorker(t, pjReleases[3], n.Addr()).checkConnectivity(n.Addr(), "127.0.0.1", port)
	if a.outcome != pjAccepted || string(a.data) != "true" {
		t.Fatalf("checkConnectivity against PowerJob's PingPongSocketServer answer: %s data=%s, want true", a.outcome, a.data)
	}
}

// Promise 5: at most ~20 dials a second per node. The limiter is a token
// bucket holding 20 at the start: in the first second it lets through
// its burst and the second's refill.
func TestBreakCheckConnectivityDialsAtMost20PerSecond(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var dials atomic.Int64
	var first atomic.Int64 // unix nanos of the first dial
	var inWindow atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			now := time.Now().UnixNano()
			dials.Add(1)
			first.CompareAndSwap(0, now)
			if now-first.Load() < int64(time.Second) {
				inWindow.Add(1)
			}
			c.Write([]byte("pong\n"))
			c.Close()
		}
	})
	t.Cleanup(func() { l.Close(); wg.Wait() })
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	w := newPJWorker(t, pjReleases[3], n.Addr())
	start := time.Now()
	// Asks at a steady pace across the first 1.2 s.
	for i := 0; time.Since(start) < 1200*time.Millisecond; i++ {
		w.get(n.Addr(), "/server/checkConnectivity?targetIp=127.0.0.1&targetPort="+port)
	}
	l.Close()
	wg.Wait()
	t.Logf("%d dials in all, %d within the first second", dials.Load(), inWindow.Load())
	if got := inWindow.Load(); got > 22 {
		t.Fatalf("%d dials within one second, want at most ~20", got)
	}
}

// Promise 1: with a 3-member cluster losing its leader, an assert of an
// app this node has not cached yet is accepted or dropped, never refused,
// and within the answer budget.
func TestBreakAssertDuringLeaderLossNeverStrands(t *testing.T) {
	e := testutil.Etcd(t, 3)
	ctx := context.Background()
	n := startNode(t, e, "s1", func(c *server.Config) { c.TTL = 5 * time.Second })
	late, err := testutil.Must(coord.NewRegistry(e.Client(), "")).Register(ctx, "late")
	if err != nil {
		t.Fatal(err)
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := e.StopLeader(lctx); err != nil {
		t.Fatal(err)
	}
	w := newPJWorker(t, pjReleases[0], n.Addr())
	for range 3 {
		start := time.Now()
		a := w.get(n.Addr(), "/server/assert?appName=late")
		var id int64
		json.Unmarshal(a.data, &id)
		t.Logf("assert during leader loss: %s id=%d after %v (%s)", a.outcome, id, time.Since(start), a.message)
		if a.outcome == pjRefused || a.outcome == pjFatal || a.took > answerBound {
			t.Fatalf("assert of a registered app during leader loss: %+v", a)
		}
		if a.outcome == pjAccepted && id != late.ID {
			t.Fatalf("assert answered id %d, want %d", id, late.ID)
		}
	}
}

// Promise 4: an owner whose transport is unreachable but whose control
// address answers is not deposed; peers answer its transport address.
// (Could not break.)
func TestBreakOwnerWithDeadTransportIsNotDeposed(t *testing.T) {
	e := testutil.Etcd(t, 1)
	ctx := context.Background()
	dead := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}()
	a := startNode(t, e, "a", func(c *server.Config) {
		c.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: dead}, coord.ProtocolAKKA: {Address: dead}}
	})
	b := startNode(t, e, "b", func(c *server.Config) {
		c.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.2:1"}, coord.ProtocolAKKA: {Address: "10.0.0.2:2"}}
	})
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	for tick := 0; tick < 5; tick++ {
		w := newPJWorker(t, pjReleases[3], b.Addr())
		w.current = dead
		for _, p := range []string{coord.ProtocolAKKA, coord.ProtocolHTTP} {
			if got, answers := w.acquire(app.ID, p); got != dead {
				t.Fatalf("tick %d %s: acquire at b answered %q, want a's transport %s (%+v)", tick, p, got, dead, answers)
			}
		}
	}
	if _, ok := a.Elector().Ownership(app.ID); !ok {
		t.Fatal("a no longer owns the app")
	}
}

// Promise 1: during a Close whose drain runs with etcd frozen, an assert
// of a registered app is accepted or dropped, within the budget. (Could
// not break.)
func TestBreakAssertDuringCloseWithEtcdFrozen(t *testing.T) {
	e := testutil.Etcd(t, 1)
	ctx := context.Background()
	registry := testutil.Must(coord.NewRegistry(e.Client(), ""))
	if _, err := registry.Register(ctx, "orders"); err != nil {
		t.Fatal(err)
	}
	n, etcd := replayNode(t, e, "s1")
	if _, err := registry.Register(ctx, "late"); err != nil {
		t.Fatal(err)
	}
	etcd("frozen")
	done := make(chan struct{})
	go func() {
		defer close(done)
		cctx, cancel := context.WithTimeout(ctx, 4*time.Second)
		defer cancel()
		n.Close(cctx)
	}()
	addr := n.Addr()
	for _, name := range []string{"orders", "late", "orders", "late"} {
		_, a := newPJWorker(t, pjReleases[0], addr).assert(name)
		t.Logf("assert %s during Close: %s after %v %s", name, a.outcome, a.took, a.detail)
		if a.outcome == pjRefused || a.outcome == pjFatal || a.took > answerBound {
			t.Errorf("assert %s during Close: %+v", name, a)
		}
	}
	<-done
}
