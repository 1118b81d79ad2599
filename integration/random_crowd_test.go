package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/worker"
)

// A crowd round is an etcd round in which crowdWorkers workers —
// worker.Discovery values sharing crowdClients etcd clients, as
// BenchmarkMemory's do — watch the groups' apps while the etcd leader is
// stopped and restarted; afterwards every one of them must name its
// app's owner, with its ServerID and token, within the same bound as the
// groups' own workers. Every crowdEvery-th etcd round, starting with the
// second, is one: a default run has one.
const (
	crowdWorkers = 1000
	crowdClients = 4
	crowdEvery   = 5
	crowdStarts  = 3 // Starts under way at once, per group
)

// crowd is one group's share of a crowd round's workers, and how many
// HTTP requests they sent to the servers (and how many were answered)
// since the crowd settled.
type crowd struct {
	g        *group
	ws       []follower
	tr       *http.Transport
	sent     atomic.Int64
	answered atomic.Int64
}

// counting is an http.RoundTripper that counts the crowd's requests.
type counting struct{ c *crowd }

func (t counting) RoundTrip(req *http.Request) (*http.Response, error) {
	t.c.sent.Add(1)
	resp, err := t.c.tr.RoundTrip(req)
	if err == nil {
		t.c.answered.Add(1)
	}
	return resp, err
}

// startCrowd starts the group's share of the crowd, spread over its
// first randomApps apps and over the run's shared clients, and waits
// until every one of them follows its app's owner: the state the round
// starts from. Close the crowd, even when it fails.
func (g *group) startCrowd(ctx context.Context) (*crowd, error) {
	n := crowdWorkers / randomGroups
	if g.index < crowdWorkers%randomGroups {
		n++
	}
	cr := &crowd{g: g, tr: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: time.Second}).DialContext,
		MaxIdleConnsPerHost: 16,
	}}
	client := &http.Client{Transport: counting{cr}}
	var servers []string
	for _, id := range g.ids {
		servers = append(servers, g.c.nodes[id].public)
	}
	cr.ws = make([]follower, n)
	errs := make(chan error, n)
	started := time.Now()
	// Worker processes start at different moments; a thousand Starts at
	// one instant would time out against a two-core machine's etcd.
	slots := make(chan struct{}, crowdStarts)
	for j := range n {
		go func() {
			slots <- struct{}{}
			defer func() { <-slots }()
			app := fmt.Sprintf("app-%d", j%randomApps)
			cfg := worker.DefaultConfig()
			cfg.AppName, cfg.Prefix, cfg.Servers = app, g.c.prefix, servers
			cfg.Client = g.r.crowdClients[j%len(g.r.crowdClients)]
			cfg.HTTPClient = client
			// A worker that cannot start (etcd and the servers too busy to
			// answer in time) is started again, as its supervisor would.
			var err error
			for range 3 {
				var d *worker.Discovery
				if d, err = worker.New(cfg); err == nil {
					if err = d.Start(ctx); err == nil {
						cr.ws[j] = follower{name: fmt.Sprintf("%s/crowd-%d", g.name, j), d: d}
						break
					}
					d.Close()
				}
			}
			errs <- err
		}()
	}
	var all []error
	for range n {
		all = append(all, <-errs)
	}
	if err := errors.Join(all...); err != nil {
		return cr, fmt.Errorf("start the crowd: %w", err)
	}
	if _, _, err := g.waitLive(ctx, started, time.Now().Add(30*time.Second), cr.ws, ""); err != nil {
		return cr, fmt.Errorf("the crowd of %d did not settle before the round: %w", n, err)
	}
	g.r.t.Logf("%s: %d crowd workers started and following in %v", g.name, n, time.Since(started).Round(time.Millisecond))
	if g.r.crowdStarted.Add(1) == randomGroups {
		g.r.crowdEtcd.reset() // count from when the whole crowd is up
	}
	return cr, nil
}

// report logs-to-be what the crowd did during the step and adds it to
// the run's count for this round.
func (cr *crowd) report(r *randomRun) string {
	sent, answered := cr.sent.Load(), cr.answered.Load()
	r.crowdCount(sent, answered)
	return fmt.Sprintf("crowd of %d sent %d HTTP requests during the step (%d answered)", len(cr.ws), sent, answered)
}

func (cr *crowd) close() {
	if cr == nil {
		return
	}
	var wg sync.WaitGroup
	for _, w := range cr.ws {
		if w.d != nil {
			wg.Go(w.d.Close)
		}
	}
	wg.Wait()
	cr.tr.CloseIdleConnections()
}

// crowdTally is the crowd rounds' HTTP requests, by round.
type crowdTally struct {
	mu     sync.Mutex
	rounds []string
	sent   int64
	answ   int64
	groups int
}

// crowdCount adds one group's figures to the current crowd round; the
// last group to report closes the round, with what the whole crowd asked
// etcd since the round began.
func (r *randomRun) crowdCount(sent, answered int64) {
	t := &r.crowdTally
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sent += sent
	t.answ += answered
	t.groups++
	if t.groups == randomGroups {
		t.rounds = append(t.rounds, fmt.Sprintf("%d sent, %d answered (etcd: %s)", t.sent, t.answ, r.crowdEtcd.String()))
		t.sent, t.answ, t.groups = 0, 0, 0
	}
}

// crowdEtcdClients dials the crowd's shared etcd clients, counting what
// they ask etcd.
func (r *randomRun) crowdEtcdClients() []*clientv3.Client {
	var out []*clientv3.Client
	for range crowdClients {
		// Silent: a thousand workers' retries during the leader loss, each
		// logged through t.Log, cost the two cores etcd needs.
		cfg := coord.ClientConfig(r.etcd.Endpoints(), hclog.NewNullLogger())
		cfg.DialOptions = append(cfg.DialOptions,
			grpc.WithChainUnaryInterceptor(r.crowdEtcd.unary), grpc.WithChainStreamInterceptor(r.crowdEtcd.stream))
		cli, err := clientv3.New(cfg)
		if err != nil {
			r.t.Fatal(err)
		}
		r.t.Cleanup(func() { cli.Close() })
		out = append(out, cli)
	}
	return out
}

// etcdCount counts the requests a client sends etcd: unary calls, and
// messages on streams (a watch created or cancelled is one), by method.
type etcdCount struct {
	mu sync.Mutex
	by map[string]int
}

func (c *etcdCount) add(method string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.by == nil {
		c.by = map[string]int{}
	}
	c.by[path.Base(method)]++
}

func (c *etcdCount) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.by = nil
}

func (c *etcdCount) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var s []string
	for m, n := range c.by {
		s = append(s, fmt.Sprintf("%s %d", m, n))
	}
	sort.Strings(s)
	if len(s) == 0 {
		return "nothing"
	}
	return strings.Join(s, ", ")
}

func (c *etcdCount) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	c.add(method)
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (c *etcdCount) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return cs, err
	}
	return countedStream{ClientStream: cs, c: c, method: method}, nil
}

type countedStream struct {
	grpc.ClientStream
	c      *etcdCount
	method string
}

func (s countedStream) SendMsg(m any) error {
	s.c.add(s.method)
	return s.ClientStream.SendMsg(m)
}

func (r *randomRun) crowdSummary() string {
	t := &r.crowdTally
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.rounds) == 0 {
		return "no crowd round"
	}
	return fmt.Sprintf("%d crowd rounds of %d workers, HTTP requests to the servers per round: %v", len(t.rounds), crowdWorkers, t.rounds)
}
