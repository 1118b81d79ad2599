// Command quickstart runs baton end to end on an embedded etcd: three
// scheduler servers, two apps, four workers per app. It shows a graceful
// handover, a crash, and the final owner table, with the time every worker
// took to follow.
//
//	go run ./examples/quickstart                       # embedded etcd, nothing to install
//	go run ./examples/quickstart -etcd 10.0.0.5:2379   # an etcd cluster of yours
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
	"github.com/batonhq/baton/worker"
)

func main() {
	endpoints := flag.String("etcd", "", "comma-separated etcd endpoints; empty starts an embedded etcd")
	prefix := flag.String("prefix", "/baton-quickstart", "key prefix (deleted at the end)")
	ttl := flag.Duration("ttl", 2*time.Second, "lease TTL of each server")
	verbose := flag.Bool("v", false, "log baton's debug output to stderr")
	flag.Parse()
	if err := run(*endpoints, *prefix, *ttl, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

// timeline prints numbered, timed lines.
type timeline struct{ start time.Time }

func (t timeline) say(format string, args ...any) {
	fmt.Printf("%7.3fs  %s\n", time.Since(t.start).Seconds(), fmt.Sprintf(format, args...))
}

func run(endpoints, prefix string, ttl time.Duration, verbose bool) error {
	logger := hclog.NewNullLogger()
	if verbose {
		logger = hclog.New(&hclog.LoggerOptions{Name: "quickstart", Level: hclog.Debug})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	defer cancel()
	tl := timeline{start: time.Now()}

	eps := strings.Split(endpoints, ",")
	if endpoints == "" {
		etcd, err := embedded.Start(embedded.Config{Logger: logger})
		if err != nil {
			return err
		}
		defer etcd.Close()
		eps = etcd.Endpoints()
		tl.say("embedded etcd up at %s", eps[0])
	}
	// Every server and the workers get a client of their own, as separate
	// processes would.
	var clients []*clientv3.Client
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	dial := func() (*clientv3.Client, error) {
		c, err := coord.Dial(ctx, eps, logger)
		if err == nil {
			clients = append(clients, c)
		}
		return c, err
	}
	admin, err := dial()
	if err != nil {
		return err
	}
	defer admin.Delete(context.Background(), prefix+"/", clientv3.WithPrefix())

	// Three servers.
	nodes := map[string]*server.Node{}
	for _, id := range []string{"server-a", "server-b", "server-c"} {
		cli, err := dial()
		if err != nil {
			return err
		}
		cfg := server.DefaultConfig()
		cfg.Client, cfg.Prefix, cfg.ServerID, cfg.TTL = cli, prefix, id, ttl
		cfg.Listen = "127.0.0.1:0"
		cfg.Logger = logger
		cfg.Callbacks = election.Callbacks{
			OnAcquire: func(_ context.Context, app, token int64) {
				tl.say("  %s starts scheduling app %d (token %d)", id, app, token)
			},
			OnLose: func(app, token int64, why election.Reason) { tl.say("  %s stops app %d (%s)", id, app, why) },
		}
		n, err := server.NewNode(cfg)
		if err != nil {
			return err
		}
		if err := n.Start(ctx); err != nil {
			return err
		}
		defer n.Close(context.Background())
		nodes[id] = n
		tl.say("%s listening on %s, lease TTL %v", id, n.Addr(), n.Session().TTL())
	}
	byAddr := func(addr string) string {
		for id, n := range nodes {
			if n.Addr() == addr {
				return id
			}
		}
		return addr
	}

	// Two apps, four workers each.
	registry, err := coord.NewRegistry(admin, prefix)
	if err != nil {
		return err
	}
	apps := map[string]int64{}
	for _, name := range []string{"orders", "billing"} {
		app, err := registry.Register(ctx, name)
		if err != nil {
			return err
		}
		apps[name] = app.ID
		tl.say("registered app %q as id %d", name, app.ID)
	}
	workerCli, err := dial()
	if err != nil {
		return err
	}
	workers := map[string][]*worker.Discovery{}
	for _, name := range []string{"orders", "billing"} {
		for i := 0; i < 4; i++ {
			cfg := worker.DefaultConfig()
			cfg.AppName, cfg.Client, cfg.Prefix, cfg.Logger = name, workerCli, prefix, logger
			cfg.Servers = []string{nodes["server-a"].Addr(), nodes["server-b"].Addr(), nodes["server-c"].Addr()}
			d, err := worker.New(cfg)
			if err != nil {
				return err
			}
			if err := d.Start(ctx); err != nil {
				return err
			}
			defer d.Close()
			workers[name] = append(workers[name], d)
		}
		cur, _ := workers[name][0].Current()
		tl.say("4 workers of %q started; they were sent to %s", name, byAddr(cur.Address))
	}
	// owners asks each live server which of the apps it acts for now,
	// with the ownership's fencing token.
	owners := func() map[string]string {
		out := map[string]string{}
		for id, n := range nodes {
			for name, app := range apps {
				if o, ok := n.Elector().Ownership(app); ok {
					out[name] = fmt.Sprintf("%s (token %d)", id, o.Token)
				}
			}
		}
		return out
	}
	ownerID := func(name string) string {
		for id, n := range nodes {
			if _, ok := n.Elector().Ownership(apps[name]); ok {
				return id
			}
		}
		return ""
	}

	// A new watch starts out "unsynced" in etcd and is caught up by a
	// loop that runs every 100 ms; long-running workers are past that.
	// Give these new ones a moment so the figures below are steady-state.
	tl.say("letting the workers' watches settle for 300 ms")
	time.Sleep(300 * time.Millisecond)

	// (a) graceful handover: drain the owner of orders.
	fmt.Println()
	from := ownerID("orders")
	tl.say("(a) draining %s, the owner of orders", from)
	followed := followInBackground(ctx, tl, workers["orders"], nodes[from].Addr())
	if err := nodes[from].Drain(ctx); err != nil {
		return err
	}
	f := <-followed
	if f.err != nil {
		return f.err
	}
	tl.say("(a) all 4 orders workers moved from %s to %s %.1f ms after the drain began", from, byAddr(f.to), ms(f.took))
	if err := nodes[from].Close(ctx); err != nil {
		return err
	}
	delete(nodes, from)

	// (b) crash: the owner of billing dies without a word.
	fmt.Println()
	victim := ownerID("billing")
	if nodes[victim] == nil {
		return fmt.Errorf("billing's owner %s is already gone", victim)
	}
	vttl := nodes[victim].Session().TTL()
	tl.say("(b) crashing %s, the owner of billing: HTTP and etcd cut, lease not revoked (TTL %v)", victim, vttl)
	followed = followInBackground(ctx, tl, workers["billing"], nodes[victim].Addr())
	servertest.Crash(nodes[victim])
	if f = <-followed; f.err != nil {
		return f.err
	}
	tl.say("(b) all 4 billing workers moved from %s to %s %.0f ms after the crash (lease TTL %v)", victim, byAddr(f.to), ms(f.took), vttl)
	delete(nodes, victim)

	// (c) the owner table.
	fmt.Println()
	tl.say("(c) owners now:")
	table := owners()
	// A new owner acts once its own watch has shown it its key, a moment
	// after the workers saw that key.
	for deadline := time.Now().Add(2 * time.Second); len(table) < len(apps) && time.Now().Before(deadline); table = owners() {
		time.Sleep(10 * time.Millisecond)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range table {
			if !yield(n) {
				return
			}
		}
	})
	for _, name := range names {
		fmt.Printf("           %-8s app %d → %s\n", name, apps[name], table[name])
	}
	tl.say("done")
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// follow is how long all workers took to leave a server, and where to.
type follow struct {
	took time.Duration
	to   string
	err  error
}

// followInBackground starts timing now and reports once every worker in
// ws has left old, printing progress while it waits. It polls the
// workers' lock-free Current every millisecond.
func followInBackground(ctx context.Context, tl timeline, ws []*worker.Discovery, old string) <-chan follow {
	out := make(chan follow, 1)
	start := time.Now()
	go func() {
		poll := time.NewTicker(time.Millisecond)
		defer poll.Stop()
		lastReport := start
		for {
			moved, to := 0, ""
			for _, w := range ws {
				if s, ok := w.Current(); ok && s.Address != old {
					moved, to = moved+1, s.Address
				}
			}
			if moved == len(ws) {
				out <- follow{took: time.Since(start), to: to}
				return
			}
			if time.Since(lastReport) >= 500*time.Millisecond {
				tl.say("    ...%d of %d workers moved so far", moved, len(ws))
				lastReport = time.Now()
			}
			select {
			case <-ctx.Done():
				out <- follow{err: fmt.Errorf("workers did not follow: %w", ctx.Err())}
				return
			case <-poll.C:
			}
		}
	}()
	return out
}
