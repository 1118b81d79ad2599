package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// TestRandomFaults runs three server processes, twenty apps and ten
// workers through a seeded random sequence of faults — SIGKILL and
// restart, SIGSTOP and SIGCONT, a partition from etcd and its healing, an
// etcd follower stopped and restarted, with a compaction of the whole
// keyspace after each — for 40 s (BATON_SOAK=10m for
// longer; BATON_SEED=n replays a run). After each fault heals, every app
// must have one owner within TTL + 1 s (+ slack for CI) and every worker
// must point at its app's owner; at the end the checker must find no
// overlap and no token going backwards.
func TestRandomFaults(t *testing.T) {
	run := 40 * time.Second
	if v := os.Getenv("BATON_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("BATON_SOAK=%q: %v", v, err)
		}
		run = d
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("BATON_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("BATON_SEED=%q: %v", v, err)
		}
		seed = s
	}
	t.Logf("seed %d (replay with BATON_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed))

	c := newCluster(t, ttl)
	ids := []string{"n1", "n2", "n3"}
	for _, id := range ids {
		c.start(id)
	}
	apps := c.register(20)
	for _, app := range apps {
		c.acquire(c.nodes[ids[rng.IntN(3)]], app)
	}
	if _, err := c.check.waitOwned(apps, "", 10*time.Second); err != nil {
		t.Fatal(err)
	}

	// Ten workers, each of one app, with etcd and the three servers.
	cli := testutil.Client(t, c.etcd)
	var workers []*worker.Discovery
	for i := range 10 {
		cfg := worker.DefaultConfig()
		cfg.AppName, cfg.Client, cfg.Prefix = fmt.Sprintf("app-%d", i*2), cli, prefix
		cfg.Interval, cfg.RequestTimeout, cfg.PingTimeout = 500*time.Millisecond, time.Second, 500*time.Millisecond
		for _, id := range ids {
			cfg.Servers = append(cfg.Servers, c.nodes[id].public)
		}
		d, err := worker.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		workers = append(workers, d)
	}

	ctx, cancel := context.WithTimeout(context.Background(), run+5*time.Minute)
	defer cancel()
	end := time.Now().Add(run)
	for step := 1; time.Now().Before(end); step++ {
		victim := c.nodes[ids[rng.IntN(3)]]
		hold := ttl/2 + time.Duration(rng.Int64N(int64(2*ttl)))
		var what string
		switch rng.IntN(4) {
		case 0:
			what = "SIGKILL and restart " + victim.id
			c.kill(victim)
			time.Sleep(hold) // the fault's duration
			c.start(victim.id)
		case 1:
			what = "SIGSTOP/SIGCONT " + victim.id
			victim.signal(syscall.SIGSTOP)
			time.Sleep(hold)
			victim.signal(syscall.SIGCONT)
		case 2:
			what = "partition " + victim.id + " from etcd"
			victim.partition(true)
			time.Sleep(hold)
			victim.partition(false)
		case 3:
			leader, err := c.etcd.Leader(ctx)
			if err != nil {
				t.Fatal(err)
			}
			member := (leader + 1 + rng.IntN(2)) % 3
			what = fmt.Sprintf("stop and restart etcd follower %d", member)
			if err := c.etcd.Stop(member); err != nil {
				t.Fatal(err)
			}
			time.Sleep(hold)
			if err := c.etcd.Restart(ctx, member); err != nil {
				t.Fatal(err)
			}
		}
		took, err := c.check.waitOwned(apps, "", ttl+time.Second+slack)
		if err != nil {
			t.Fatalf("step %d (%s, held %v): %v", step, what, hold, err)
		}
		t.Logf("step %d: %s, held %v: every app owned %v after healing", step, what, hold.Round(time.Millisecond), took.Round(time.Millisecond))
		followed(t, c, workers)
		// Compact everything while the servers and workers watch: their
		// watches are synced, so nothing may break; a watch that was
		// behind must recover by reading again.
		if cur, err := c.etcd.Client().Get(ctx, "compact-marker"); err == nil {
			if _, err := c.etcd.Client().Compact(ctx, cur.Header.Revision); err != nil {
				t.Logf("compact at %d: %v", cur.Header.Revision, err)
			}
		}
		if problems := c.check.verdict(); len(problems) > 0 {
			for _, p := range problems {
				t.Error(p)
			}
			t.FailNow()
		}
	}
}

// followed waits until every worker points at its app's owner.
func followed(t *testing.T, c *cluster, workers []*worker.Discovery) {
	t.Helper()
	testutil.Eventually(t, ttl+time.Second+slack, "workers to point at their owners", func() bool {
		owners := c.check.owners()
		for _, w := range workers {
			cur, ok := w.Current()
			server := owners[w.AppID()]
			if !ok || len(server) != 1 || c.nodes[server[0]].public != cur.Address {
				return false
			}
		}
		return true
	})
}
