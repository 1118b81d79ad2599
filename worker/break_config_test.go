package worker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batonhq/baton/worker"
)

// validHostPort (config.go) accepts Servers entries that no request can
// be sent to: net.SplitHostPort keeps spaces in the host, and
// strconv.Atoi takes a sign in the port. New accepts them, and the worker
// fails at run time instead — Start says "no server available" with a
// URL parse error inside, a lazy worker just never finds a server.
//
// Proves: bad config does not always get ErrInvalidConfig naming the
// field.
func TestConfigRejectsServerAddressesNoRequestCanUse(t *testing.T) {
	for _, addr := range []string{" h:1", "h :1", "h:+1", "h\t:1"} {
		cfg := worker.DefaultConfig()
		cfg.AppName = "orders"
		cfg.Servers = []string{addr}
		cfg.RequestTimeout = 200 * time.Millisecond
		cfg.PingTimeout = 100 * time.Millisecond
		d, err := worker.New(cfg)
		if err == nil {
			err = d.Start(context.Background())
			d.Close()
			t.Errorf("New accepted Servers entry %q; Start then said: %v", addr, err)
			continue
		}
		if !errors.Is(err, worker.ErrInvalidConfig) || !contains(err.Error(), "Servers entry") {
			t.Errorf("New(%q) = %v, want ErrInvalidConfig naming the Servers entry", addr, err)
		}
	}
}
