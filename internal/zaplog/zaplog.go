// Package zaplog forwards the zap logs of etcd's client and server to an
// hclog logger.
package zaplog

import (
	"fmt"
	"sort"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New returns a zap logger that writes to logger, for the etcd
// client and server (which log through zap) so that their output lands where
// the rest of baton's does. Entries below minLevel are dropped; a nil logger
// gives a logger that writes nothing.
func New(logger hclog.Logger, minLevel zapcore.Level) *zap.Logger {
	return NewQuietable(logger, minLevel, nil)
}

// NewQuietable is New, except that while quiet returns true every entry
// is logged at debug level: an etcd server being shut down on purpose
// reports its closing listeners as errors.
func NewQuietable(logger hclog.Logger, minLevel zapcore.Level, quiet func() bool) *zap.Logger {
	if logger == nil {
		return zap.NewNop()
	}
	if quiet == nil {
		quiet = func() bool { return false }
	}
	return zap.New(&hclogCore{logger: logger, min: minLevel, quiet: quiet})
}

// hclogCore is a zapcore.Core that forwards entries to an hclog logger.
type hclogCore struct {
	logger hclog.Logger
	min    zapcore.Level
	quiet  func() bool
	fields []zapcore.Field
}

// level is the hclog level an entry of level l is logged at.
func (c *hclogCore) level(l zapcore.Level) hclog.Level {
	if c.quiet() {
		return hclog.Debug
	}
	return hclogLevel(l)
}

func (c *hclogCore) Enabled(l zapcore.Level) bool {
	return l >= c.min && c.logger.GetLevel() <= c.level(l)
}

func (c *hclogCore) With(fields []zapcore.Field) zapcore.Core {
	clone := *c
	clone.fields = append(append([]zapcore.Field(nil), c.fields...), fields...)
	return &clone
}

func (c *hclogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *hclogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	args := make([]any, 0, 2*len(keys)+2)
	if e.LoggerName != "" {
		args = append(args, "zap_logger", e.LoggerName)
	}
	for _, k := range keys {
		v := enc.Fields[k]
		if s, ok := v.(fmt.Stringer); ok {
			v = s.String()
		}
		args = append(args, k, v)
	}
	c.logger.Log(c.level(e.Level), e.Message, args...)
	return nil
}

func (c *hclogCore) Sync() error { return nil }

func hclogLevel(l zapcore.Level) hclog.Level {
	switch {
	case l < zapcore.InfoLevel:
		return hclog.Debug
	case l == zapcore.InfoLevel:
		return hclog.Info
	case l == zapcore.WarnLevel:
		return hclog.Warn
	default:
		return hclog.Error
	}
}
