package election_test

import (
	"context"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestRandomElectionFaults composes faults at random — nodes cut off from etcd,
// partitions between servers (pings), stalled receive paths (lost or late
// responses), broken connections — with elections, resignations and
// handovers, on servers with different TTLs, and checks the recorder:
// no overlap, tokens increasing, callbacks in order.
func TestRandomElectionFaults(t *testing.T) {
	seed, dur := chaosSettings(t)
	rng := rand.New(rand.NewPCG(uint64(seed), 1))
	var rmu sync.Mutex
	rnd := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return rng.IntN(n) }
	between := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(rnd(int(hi-lo))) }

	c := newCluster(t, 1, time.Second)
	nodes := []*node{
		c.addNodeTTL("a", time.Second, viaProxy()),
		c.addNodeTTL("b", time.Second, viaProxy()),
		c.addNodeTTL("c", 2*time.Second, viaProxy()),
		c.addNodeTTL("d", 3*time.Second, viaProxy()),
	}
	apps := c.registerN(t, 6)

	var fmu sync.Mutex
	busy := map[string]bool{}
	var wg sync.WaitGroup
	fault := func(n *node, on, off func(), d time.Duration) {
		fmu.Lock()
		if busy[n.id] {
			fmu.Unlock()
			return
		}
		busy[n.id] = true
		fmu.Unlock()
		on()
		wg.Go(func() {
			time.Sleep(d)
			off()
			fmu.Lock()
			busy[n.id] = false
			fmu.Unlock()
		})
	}
	stop := time.Now().Add(dur)
	for time.Now().Before(stop) {
		n := nodes[rnd(len(nodes))]
		app := apps[rnd(len(apps))]
		switch k := rnd(100); {
		case k < 40:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
			})
		case k < 50:
			d := between(300*time.Millisecond, 4*time.Second)
			fault(n, func() {
				n.proxy.PauseTx()
				n.proxy.PauseRx()
				c.pinger.setDown(n.addr, true)
			}, func() {
				n.proxy.UnpauseTx()
				n.proxy.UnpauseRx()
				c.pinger.setDown(n.addr, false)
			}, d)
		case k < 60:
			d := between(200*time.Millisecond, 2*time.Second)
			wg.Go(func() {
				c.pinger.setDown(n.addr, true)
				time.Sleep(d)
				c.pinger.setDown(n.addr, false)
			})
		case k < 68:
			d := between(30*time.Millisecond, 1500*time.Millisecond)
			fault(n, n.proxy.PauseRx, n.proxy.UnpauseRx, d)
		case k < 72:
			fault(n, func() { n.proxy.ModifyRx(breakConnectionOnce()) }, n.proxy.UnmodifyRx, 200*time.Millisecond)
		case k < 82:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				n.el.Resign(ctx, app)
			})
		case k < 92:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				n.el.HandOver(ctx, app)
			})
		default:
			d := between(30*time.Millisecond, 800*time.Millisecond)
			fault(n, n.proxy.PauseTx, n.proxy.UnpauseTx, d)
		}
		time.Sleep(between(20*time.Millisecond, 250*time.Millisecond))
	}
	wg.Wait()
	problems, worst := c.rec.checkTolerating(0)
	for _, p := range problems {
		t.Error(p)
	}
	t.Logf("events %d, worst overlap %v", len(c.rec.snapshot()), worst)
}

// TestRandomElectionFaultsWithEtcdMemberLoss is TestRandomElectionFaults on a 3-member etcd whose
// members crash and restart (leader included, sometimes two at once:
// quorum loss), with two servers behind proxies to single members and two
// talking to every member.
func TestRandomElectionFaultsWithEtcdMemberLoss(t *testing.T) {
	seed, dur := chaosSettings(t)
	rng := rand.New(rand.NewPCG(uint64(seed), 2))
	var rmu sync.Mutex
	rnd := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return rng.IntN(n) }
	between := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(rnd(int(hi-lo))) }

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
	apps := c.registerN(t, 6)

	var mmu sync.Mutex
	down := map[int]bool{}
	var wg sync.WaitGroup
	stop := time.Now().Add(dur)
	for time.Now().Before(stop) {
		n := nodes[rnd(len(nodes))]
		app := apps[rnd(len(apps))]
		switch k := rnd(100); {
		case k < 45:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
			})
		case k < 55:
			i := rnd(3)
			if rnd(3) == 0 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				l, err := c.etcd.Leader(ctx)
				cancel()
				if err == nil {
					i = l
				}
			}
			mmu.Lock()
			if down[i] || len(down) >= 2 || (len(down) == 1 && rnd(3) != 0) {
				mmu.Unlock()
				break
			}
			down[i] = true
			mmu.Unlock()
			d := between(200*time.Millisecond, 3*time.Second)
			wg.Go(func() {
				if err := c.etcd.Stop(i); err != nil {
					t.Logf("stop %d: %v", i, err)
				}
				time.Sleep(d)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if err := c.etcd.Restart(ctx, i); err != nil {
					t.Errorf("restart %d: %v", i, err)
				}
				mmu.Lock()
				delete(down, i)
				mmu.Unlock()
			})
		case k < 70:
			d := between(200*time.Millisecond, 2*time.Second)
			wg.Go(func() {
				c.pinger.setDown(n.addr, true)
				time.Sleep(d)
				c.pinger.setDown(n.addr, false)
			})
		case k < 85:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				n.el.Resign(ctx, app)
			})
		default:
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				n.el.HandOver(ctx, app)
			})
		}
		time.Sleep(between(20*time.Millisecond, 250*time.Millisecond))
	}
	wg.Wait()
	problems, worst := c.rec.checkTolerating(0)
	for _, p := range problems {
		t.Error(p)
	}
	t.Logf("events %d, worst overlap %v", len(c.rec.snapshot()), worst)
}

// chaosSettings reads the seed (BATON_SEED, to replay a run) and the length
// (BATON_SOAK, default 10 s) of a random fault run.
func chaosSettings(t *testing.T) (seed int64, run time.Duration) {
	seed, run = time.Now().UnixNano(), 10*time.Second
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
	return seed, run
}
