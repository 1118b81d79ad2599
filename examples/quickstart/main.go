// Command quickstart shows baton's foundation at work on an embedded etcd:
// it registers apps, opens a server's guarded session, prints every key it
// wrote, and shows the keys bound to the lease disappear on Close.
//
//	go run ./examples/quickstart                 # embedded etcd, nothing to install
//	go run ./examples/quickstart -etcd host:2379 # an etcd cluster of yours
//
// It grows into the full demo (servers, workers, failover) as the election,
// server and worker packages land.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

func main() {
	endpoints := flag.String("etcd", "", "comma-separated etcd endpoints; empty starts an embedded etcd")
	prefix := flag.String("prefix", "/baton-quickstart", "key prefix")
	verbose := flag.Bool("v", false, "log baton's and etcd's debug output to stderr")
	flag.Parse()
	if err := run(*endpoints, *prefix, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run(endpoints, prefix string, verbose bool) error {
	logger := hclog.NewNullLogger()
	if verbose {
		logger = hclog.New(&hclog.LoggerOptions{Name: "quickstart", Level: hclog.Debug})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	start := time.Now()
	step := func(format string, args ...any) {
		fmt.Printf("%6dms  %s\n", time.Since(start).Milliseconds(), fmt.Sprintf(format, args...))
	}

	var cli *clientv3.Client
	if endpoints == "" {
		etcd, err := coord.StartEmbedded(coord.EmbeddedConfig{Logger: logger})
		if err != nil {
			return err
		}
		defer etcd.Close()
		cli = etcd.Client()
		step("embedded etcd is up at %s", strings.Join(etcd.Endpoints(), ","))
	} else {
		var err error
		cli, err = coord.Dial(ctx, strings.Split(endpoints, ","), logger)
		if err != nil {
			return err
		}
		defer cli.Close()
		step("connected to etcd at %s", endpoints)
	}

	keys, err := coord.NewKeys(prefix)
	if err != nil {
		return err
	}
	registry := coord.NewRegistry(cli, keys)
	for _, name := range []string{"orders", "billing", "orders"} {
		app, err := registry.Register(ctx, name)
		if err != nil {
			return err
		}
		step("app %q has id %d", name, app.ID)
	}

	register, err := coord.RegisterServer(cli, keys, coord.ServerRecord{
		ServerID:  "server-1",
		Protocols: coord.Protocols{coord.ProtocolHTTP: {Address: "127.0.0.1:7700"}},
		StartedAt: time.Now(),
		Software:  "quickstart",
	})
	if err != nil {
		return err
	}
	session, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, Keys: keys, TTL: 2 * time.Second, OnLease: register, Logger: logger})
	if err != nil {
		return err
	}
	epoch := session.Epoch()
	step("session holds lease %x (TTL %v granted); guard confirmed until %v from now",
		session.Lease(), session.TTL(), time.Until(epoch.Deadline()).Round(time.Millisecond))

	// Let a few confirmation rounds run: the deadline keeps moving forward.
	for i := 0; i < 3; i++ {
		before := epoch.Deadline()
		if err := waitFor(ctx, func() bool { return epoch.Deadline().After(before) }); err != nil {
			return err
		}
		step("round confirmed the lease: deadline moved %v forward", epoch.Deadline().Sub(before).Round(time.Millisecond))
	}

	if err := printKeys(ctx, cli, keys, "keys under "+prefix); err != nil {
		return err
	}
	if err := session.Close(ctx); err != nil {
		return err
	}
	step("session closed: epoch ended with %q; lease revoked", epoch.Err())
	if err := printKeys(ctx, cli, keys, "keys left after Close (the server key was bound to the lease)"); err != nil {
		return err
	}
	// Leave an external cluster as we found it.
	if endpoints != "" {
		if _, err := cli.Delete(ctx, prefix+"/", clientv3.WithPrefix()); err != nil {
			return err
		}
	}
	step("done")
	return nil
}

func printKeys(ctx context.Context, cli *clientv3.Client, keys coord.Keys, title string) error {
	resp, err := cli.Get(ctx, keys.Prefix()+"/", clientv3.WithPrefix())
	if err != nil {
		return err
	}
	fmt.Printf("\n  %s:\n", title)
	for _, kv := range resp.Kvs {
		lease := "no lease"
		if kv.Lease != 0 {
			lease = fmt.Sprintf("lease %x", kv.Lease)
		}
		fmt.Printf("    %-40s %-22s %s\n", kv.Key, lease, kv.Value)
	}
	fmt.Println()
	return nil
}

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, cond func() bool) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}
