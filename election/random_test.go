package election_test

import (
	"context"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// TestRandomElectionFaults composes faults at random — nodes cut off from
// etcd, partitions between servers (pings), stalled receive paths (lost or
// late responses), broken connections — with elections, resignations and
// handovers, on servers with different TTLs, and checks the recorder: no
// overlap, tokens increasing, callbacks in order.
func TestRandomElectionFaults(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	nodes := []*node{
		c.addNodeTTL("a", time.Second, viaProxy()),
		c.addNodeTTL("b", time.Second, viaProxy()),
		c.addNodeTTL("c", 2*time.Second, viaProxy()),
		c.addNodeTTL("d", 3*time.Second, viaProxy()),
	}
	r := newChaos(t, c, 1)
	var fmu sync.Mutex
	busy := map[string]bool{}
	// fault runs on, then off d later, unless n is under a fault already.
	fault := func(n *node, on, off func(), d time.Duration) {
		fmu.Lock()
		if busy[n.id] {
			fmu.Unlock()
			return
		}
		busy[n.id] = true
		fmu.Unlock()
		on()
		r.wg.Go(func() {
			time.Sleep(d) // the fault's duration
			off()
			fmu.Lock()
			busy[n.id] = false
			fmu.Unlock()
		})
	}
	r.run(nodes, func(n *node, app int64, k int) {
		switch {
		case k < 40:
			r.elect(n, app)
		case k < 50:
			fault(n, func() {
				n.proxy.PauseTx()
				n.proxy.PauseRx()
				c.pinger.setDown(n.addr, true)
			}, func() {
				n.proxy.UnpauseTx()
				n.proxy.UnpauseRx()
				c.pinger.setDown(n.addr, false)
			}, r.between(300*time.Millisecond, 4*time.Second))
		case k < 60:
			r.pingsDown(n, r.between(200*time.Millisecond, 2*time.Second))
		case k < 68:
			fault(n, n.proxy.PauseRx, n.proxy.UnpauseRx, r.between(30*time.Millisecond, 1500*time.Millisecond))
		case k < 72:
			fault(n, func() { n.proxy.ModifyRx(breakConnectionOnce()) }, n.proxy.UnmodifyRx, 200*time.Millisecond)
		case k < 82:
			r.resign(n, app)
		case k < 92:
			r.handOver(n, app)
		default:
			fault(n, n.proxy.PauseTx, n.proxy.UnpauseTx, r.between(30*time.Millisecond, 800*time.Millisecond))
		}
	})
}

// TestRandomElectionFaultsWithEtcdMemberLoss is TestRandomElectionFaults
// on a 3-member etcd whose members crash and restart (leader included,
// sometimes two at once: quorum loss), with two servers behind proxies to
// single members and two talking to every member.
func TestRandomElectionFaultsWithEtcdMemberLoss(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	viaMember := func(i int) nodeOption {
		return withClient(func([]string) *clientv3.Client {
			_, url := testutil.Proxy(t, c.etcd.Endpoint(i))
			return testutil.Client(t, c.etcd, url)
		})
	}
	nodes := []*node{
		c.addNodeTTL("a", time.Second, viaMember(1)),
		c.addNodeTTL("b", 2*time.Second, viaMember(2)),
		c.addNodeTTL("c", time.Second),
		c.addNodeTTL("d", 3*time.Second),
	}
	r := newChaos(t, c, 2)
	var mmu sync.Mutex
	down := map[int]bool{}
	// memberDown stops member i for d, unless that would stop a third.
	memberDown := func(i int, d time.Duration) {
		mmu.Lock()
		defer mmu.Unlock()
		if down[i] || len(down) >= 2 || (len(down) == 1 && r.intN(3) != 0) {
			return
		}
		down[i] = true
		r.wg.Go(func() {
			if err := c.etcd.Stop(i); err != nil {
				t.Logf("stop %d: %v", i, err)
			}
			time.Sleep(d) // the outage's duration
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := c.etcd.Restart(ctx, i); err != nil {
				t.Errorf("restart %d: %v", i, err)
			}
			mmu.Lock()
			delete(down, i)
			mmu.Unlock()
		})
	}
	r.run(nodes, func(n *node, app int64, k int) {
		switch {
		case k < 45:
			r.elect(n, app)
		case k < 55:
			i := r.intN(3)
			if r.intN(3) == 0 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				if l, err := c.etcd.Leader(ctx); err == nil {
					i = l
				}
				cancel()
			}
			memberDown(i, r.between(200*time.Millisecond, 3*time.Second))
		case k < 70:
			r.pingsDown(n, r.between(200*time.Millisecond, 2*time.Second))
		case k < 85:
			r.resign(n, app)
		default:
			r.handOver(n, app)
		}
	})
}

// chaos is one random fault run: its seeded choices, its length, and the
// goroutines its actions and faults run in.
type chaos struct {
	t      *testing.T
	c      *cluster
	length time.Duration
	wg     sync.WaitGroup

	mu  sync.Mutex
	rng *rand.Rand
}

// newChaos reads the seed (BATON_SEED, to replay a run's choices) and the
// length (BATON_SOAK, default 10 s) of a random fault run; stream tells
// two tests' choices apart under one seed.
func newChaos(t *testing.T, c *cluster, stream uint64) *chaos {
	seed, run := time.Now().UnixNano(), 10*time.Second
	if v := os.Getenv("BATON_SEED"); v != "" {
		s, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("BATON_SEED=%q: %v", v, err)
		}
		seed = s
	}
	if v := os.Getenv("BATON_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("BATON_SOAK=%q: %v", v, err)
		}
		run = d
	}
	t.Logf("seed %d (replay with BATON_SEED=%d), running %v", seed, seed, run)
	return &chaos{t: t, c: c, length: run, rng: rand.New(rand.NewPCG(uint64(seed), stream))}
}

func (r *chaos) intN(n int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rng.IntN(n)
}

// between is a random duration in [lo, hi).
func (r *chaos) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(r.intN(int(hi-lo)))
}

// run picks a node, an app and a number in [0, 100) every 20–250 ms and
// hands them to step, for the run's length; then it waits for every
// action and fault to end and checks the recorder.
func (r *chaos) run(nodes []*node, step func(n *node, app int64, k int)) {
	apps := r.c.registerN(r.t, 6)
	for stop := time.Now().Add(r.length); time.Now().Before(stop); {
		step(nodes[r.intN(len(nodes))], apps[r.intN(len(apps))], r.intN(100))
		time.Sleep(r.between(20*time.Millisecond, 250*time.Millisecond)) // the pace of the run
	}
	r.wg.Wait()
	problems, worst := r.c.rec.checkTolerating(0)
	for _, p := range problems {
		r.t.Error(p)
	}
	r.t.Logf("events %d, worst overlap %v", len(r.c.rec.snapshot()), worst)
}

// elect, resign and handOver run one election action in the background,
// bounded as a worker's or an operator's request would be.
func (r *chaos) elect(n *node, app int64) {
	r.background(time.Second, func(ctx context.Context) { n.el.Elect(ctx, app, coord.ProtocolHTTP, "") })
}

func (r *chaos) resign(n *node, app int64) {
	r.background(time.Second, func(ctx context.Context) { n.el.Resign(ctx, app) })
}

func (r *chaos) handOver(n *node, app int64) {
	r.background(2*time.Second, func(ctx context.Context) { n.el.HandOver(ctx, app) })
}

func (r *chaos) background(timeout time.Duration, f func(context.Context)) {
	r.wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		f(ctx)
	})
}

// pingsDown makes n answer no pings for d: a partition between servers.
func (r *chaos) pingsDown(n *node, d time.Duration) {
	r.wg.Go(func() {
		r.c.pinger.setDown(n.addr, true)
		time.Sleep(d) // the partition's duration
		r.c.pinger.setDown(n.addr, false)
	})
}
