package worker_test

import (
	"context"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// proxiedFleet starts n workers of app whose etcd client goes through
// proxy (one client shared by all, as workers of one host group share
// their proxy), listing every node as a server.
func proxiedFleet(t *testing.T, e *etcdcluster.Cluster, proxy *etcdcluster.GRPCProxy, app string, nodes []*server.Node, n int) []*recorder {
	t.Helper()
	cli := testutil.Client(t, e, proxy.Endpoint())
	var servers []string
	for _, node := range nodes {
		servers = append(servers, node.Addr())
	}
	var fleet []*recorder
	for range n {
		fleet = append(fleet, startWorker(t, app, func(c *worker.Config) {
			c.Client = cli
			c.Servers = servers
			c.EtcdGrace = time.Second
			c.Interval = time.Second
		}))
	}
	return fleet
}

// proxiedSetup is a 3-member etcd with a gRPC proxy, servers s1 and s2,
// app "orders" owned by s1, and 20 workers watching it through the proxy.
func proxiedSetup(t *testing.T) (*etcdcluster.Cluster, *etcdcluster.GRPCProxy, []*server.Node, int64, []*recorder) {
	t.Helper()
	e := testutil.Etcd(t, 3)
	proxy, err := e.StartGRPCProxy()
	if err != nil {
		t.Fatal(err)
	}
	nodes := []*server.Node{startNode(t, e, "s1", "127.0.0.1:0"), startNode(t, e, "s2", "127.0.0.1:0")}
	app := register(t, testutil.Client(t, e), "orders")
	elect(t, nodes[0], app)
	fleet := proxiedFleet(t, e, proxy, "orders", nodes, 20)
	allAt(t, fleet, nodes[0].Addr(), true, "every worker watching s1 through the proxy")
	return e, proxy, nodes, app, fleet
}

// allAt waits until every worker is at addr and, if watching, follows the
// owner key in etcd again.
func allAt(t *testing.T, fleet []*recorder, addr string, watching bool, what string) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, what, func() bool {
		for _, w := range fleet {
			if w.current() != addr || watching && w.metric(t, "baton_worker_watching", "") != 1 {
				return false
			}
		}
		return true
	})
}

// Workers reach etcd through etcd's gRPC proxy: they watch through it and
// follow a handover; when the proxy goes away they keep their server,
// fall back to polling the servers and follow a handover that way; once
// the proxy is back they watch again, and follow the next handover from
// etcd.
func TestWorkersThroughAGRPCProxyRideOutItsRestart(t *testing.T) {
	_, proxy, nodes, app, fleet := proxiedSetup(t)

	handOver := func(from *server.Node) string {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		to, err := from.Elector().HandOver(ctx, app)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if n.ID() == to {
				return n.Addr()
			}
		}
		t.Fatalf("handed over to unknown server %q", to)
		return ""
	}
	allAt(t, fleet, handOver(nodes[0]), true, "every worker to follow the handover through the proxy")

	proxy.Stop()
	testutil.Eventually(t, 20*time.Second, "every worker to poll while the proxy is down", func() bool {
		for _, w := range fleet {
			if w.metric(t, "baton_worker_watching", "") != 0 {
				return false
			}
		}
		return true
	})
	owner := nodes[1]
	if owner.Addr() != fleet[0].current() {
		owner = nodes[0]
	}
	other := handOver(owner)
	allAt(t, fleet, other, false, "every worker to follow a handover by polling while the proxy is down")

	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	allAt(t, fleet, other, true, "every worker to watch again once the proxy is back")
	for _, n := range nodes {
		if n.Addr() == other {
			owner = n
		}
	}
	allAt(t, fleet, handOver(owner), true, "every worker to follow the next handover through the proxy")
}

// An etcd leader loss under the proxy: workers keep following the owner.
// The proxy does not pass require-leader on (its upstream watches carry
// none), so a worker learns of the loss only if the member its proxy
// talks to goes; either way it ends at the owner, watching.
func TestWorkersThroughAGRPCProxyFollowAcrossALeaderLoss(t *testing.T) {
	e, _, nodes, app, fleet := proxiedSetup(t)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stopped, err := e.StopLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var to string
	testutil.Eventually(t, 20*time.Second, "a handover once etcd has a new leader", func() bool {
		hctx, hcancel := context.WithTimeout(ctx, 3*time.Second)
		defer hcancel()
		to, err = nodes[0].Elector().HandOver(hctx, app)
		return err == nil
	})
	if to != "s2" {
		t.Fatalf("handed over to %q", to)
	}
	allAt(t, fleet, nodes[1].Addr(), false, "every worker to follow the handover after the leader loss")
	if err := e.Restart(ctx, stopped); err != nil {
		t.Fatal(err)
	}
	allAt(t, fleet, nodes[1].Addr(), true, "every worker watching once the member is back")
}
